"""FedEx-LoRA's residual downlink on the default experiment, dense against factored.

The dense message is the residual sum of every wrapped layer (L d_out d_in floats). In factored
form one round's residual, sum_{k<K} p_k (B_k - B_bar)(A_k - A_K), is rank <= (K - 1) r per
layer, (K - 1) r (d_in + d_out) floats, and a client needs every round since it last held the
base. This replays the default experiment's
client sampling and counts the residual floats each way (no training).

    python simulations/fedex_downlink.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse

from fedpeft.core.sampling import sample_clients


def residual_floats(seed: int, *, layers: int = 12, d_in: int = 384, d_out: int = 384,
                    rank: int = 8, clients: int = 100, per_round: int = 10,
                    rounds: int = 15) -> dict[str, int]:
    """Floats of residual sent over a run: dense, factored, and the smaller per message."""
    dense = layers * d_in * d_out
    one_round = layers * (per_round - 1) * rank * (d_in + d_out)
    held: dict[int, int] = {}  # client -> the last aggregate its base included
    out = {"dense": 0, "factored": 0, "smaller": 0, "messages": 0, "factored_wins": 0}
    for t in range(2, rounds + 1):  # round 1's downlink has no residual yet
        for client in sample_clients(clients, per_round, seed, t):
            factored = (t - 1 - held.get(client, 0)) * one_round
            out["dense"] += dense
            out["factored"] += factored
            out["smaller"] += min(dense, factored)
            out["messages"] += 1
            out["factored_wins"] += factored < dense
            held[client] = t - 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    for seed in parser.parse_args().seeds:
        f = residual_floats(seed)
        print(f"seed {seed}: dense {f['dense']:,} floats; factored {f['factored']:,} "
              f"({f['factored'] / f['dense']:.2f}x); smaller per message {f['smaller']:,} "
              f"({f['smaller'] / f['dense']:.2f}x; factored smaller in {f['factored_wins']} of "
              f"{f['messages']} messages)")


if __name__ == "__main__":
    main()
