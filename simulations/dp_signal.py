"""Where a fresh classifier's signal is, which decides what DP-SGD can learn (docs/privacy.md,
"Which settings learn under DP-SGD"). Two measurements on the real model and data (MiniLM-L6,
a Rotten Tomatoes client of the DP sweep's 2-client iid split), no training:

- ``features``: per summary of a text (the first token, BERT's pooler, the mean over real
  tokens), a linear probe's test accuracy (L-BFGS on frozen features of ``--train`` training
  examples) and how much the features share one direction (the norm of their mean vector over
  the mean norm of a feature: near 1, noise on a head's weights shifts every text's logits
  alike);
- ``gradients``: at the fresh FFA-LoRA model, each LoRA module's share of the squared norm of
  the mean per-example gradient (each clipped to ``--clip``, as under DP-SGD), next to its
  share of the coordinates.

    python -m simulations.dp_signal features --train 2000
    python -m simulations.dp_signal gradients --pooling mean --examples 512
"""

from __future__ import annotations

import argparse
import re
import warnings

import numpy as np
import torch

from fedpeft.core.config import load_config
from fedpeft.core.privacy import per_sample_hooks
from fedpeft.core.workspace import Workspace, get_workspace

SPLIT = ["federation.clients=2", "federation.clients_per_round=2", 'data.partitioner="iid"']


def workspace(pooling: str) -> Workspace:
    return get_workspace(load_config(None, [*SPLIT, f'model.pooling="{pooling}"']))


def summaries(ws: Workspace, data: object, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """Frozen features of ``indices``: first token, BERT's pooler on it, masked mean."""
    model = ws.adapter_model(8).model.eval()
    pooler = next(m for n, m in model.named_modules() if n.endswith("bert.pooler"))
    out: dict[str, list[torch.Tensor]] = {"first token": [], "pooler": [], "mean": [], "y": []}
    for start in range(0, len(indices), 128):
        batch = data.batch(indices[start : start + 128])  # type: ignore[attr-defined]
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states[-1]
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out["first token"].append(hidden[:, 0])
            out["pooler"].append(pooler(hidden))
            out["mean"].append((hidden * mask).sum(1) / mask.sum(1))
        out["y"].append(batch["labels"])
    return {k: torch.cat(v) for k, v in out.items()}


def probe(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Test accuracy of an L2-regularised logistic regression fitted by L-BFGS."""
    w = torch.zeros(x.shape[1], 2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((x_test @ w + b).argmax(1) == y_test).float().mean())


def features(args: argparse.Namespace) -> None:
    ws = workspace("auto")  # the pooler stays in place; the mean is taken here
    train, test = ws.partition(0, 2), ws.test_set()
    tr = summaries(ws, train, np.arange(min(args.train, len(train))))
    te = summaries(ws, test, np.arange(len(test)))
    print(f"linear probe: {len(tr['y'])} training examples, {len(te['y'])} test examples")
    print("| summary | probe test accuracy | mean vector / mean feature norm |")
    print("|---|---:|---:|")
    for name in ("first token", "pooler", "mean"):
        shared = float(tr[name].mean(0).norm() / tr[name].norm(dim=1).mean())
        print(f"| {name} | {probe(tr[name], tr['y'], te[name], te['y']):.3f} | {shared:.2f} |")


def gradients(args: argparse.Namespace) -> None:
    ws = workspace(args.pooling)
    data = ws.partition(0, 2)
    adapter = ws.adapter_model(8)
    adapter.set_trainable({k for k in adapter.params if ".lora_A." not in k})
    params = {k: adapter.params[k] for k in adapter.trainable_keys() if k not in adapter.head_keys}
    rng = np.random.default_rng(0)
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    chosen = rng.choice(len(data), args.examples, replace=False)
    for start in range(0, len(chosen), 128):
        with per_sample_hooks(adapter.model):
            adapter.model.train()
            adapter.model(**data.batch(chosen[start : start + 128])).loss.backward()
            norms = sum((p.grad_sample.flatten(1) ** 2).sum(1) for p in params.values()).sqrt()
            factor = (args.clip / (norms + 1e-6)).clamp(max=1.0)
            for k, p in params.items():
                sums[k] += (p.grad_sample * factor.view(-1, 1, 1)).sum(0)
    modules: dict[str, list[float]] = {}
    for k, total in sums.items():
        name = re.search(r"layer\.\d+\.attention\.self\.\w+", k)
        entry = modules.setdefault(name.group(0) if name else k, [0.0, 0.0])
        entry[0] += float(((total / len(chosen)) ** 2).sum())
        entry[1] += total.numel()
    signal = sum(v[0] for v in modules.values())
    coords = sum(v[1] for v in modules.values())
    print(f"pooling {args.pooling}: {len(chosen)} examples clipped to {args.clip}; LoRA B mean "
          f"gradient norm {signal**0.5:.4f} over {int(coords)} coordinates")
    print("| LoRA module | share of squared mean gradient | share of coordinates |")
    print("|---|---:|---:|")
    for name, (s2, n) in modules.items():
        print(f"| {name} | {s2 / signal:.3f} | {n / coords:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    feat = sub.add_parser("features", help="linear probes on three summaries of a text")
    feat.add_argument("--train", type=int, default=2000, help="training examples for the probe")
    grad = sub.add_parser("gradients", help="LoRA's mean gradient per module")
    grad.add_argument("--pooling", choices=("auto", "mean"), default="mean")
    grad.add_argument("--examples", type=int, default=512, help="multiple of 128")
    grad.add_argument("--clip", type=float, default=0.05, help="per-example clipping norm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    features(args) if args.what == "features" else gradients(args)


if __name__ == "__main__":
    main()
