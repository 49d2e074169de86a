"""Measure a loopback deployment: per-round overhead and bytes on the wire.

Starts ``fedpeft server`` (TLS, SuperNode authentication) and N ``fedpeft client`` processes on
127.0.0.1, each device with its own small CSV cut from the Rotten Tomatoes corpus, tiny-bert.
The devices reach the coordinator through a TCP relay that counts the bytes in each direction:
that is the TLS traffic on the wire (without TCP/IP headers). For each round it reports

    overhead_s = wall_s - eval_s - train_s      (from metrics.jsonl; train_s summed over clients)
    wire_up / wire_down                         (relay bytes between two metrics.jsonl rows)
    bytes_up / bytes_down                       (what metrics.jsonl reports: serialised records)

    python simulations/deploy_overhead.py --isolation process --rounds 6 --out runs/overhead
    python simulations/deploy_overhead.py --isolation subprocess --rounds 6 --out runs/overhead0

Run it alone (``flock /tmp/fedpeft-cpu.lock``): other CPU load inflates every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
from fedpeft.server.reporting import MetricsLog

from fedpeft.core.data import RT_LABELS, rotten_tomatoes_path
from fedpeft.deploy.certs import make_certs
from fedpeft.deploy.processes import free_port, spawn, stop_all
from fedpeft.run.launcher import Tracker


class ByteRelay:
    """TCP relay 127.0.0.1:port -> 127.0.0.1:target counting bytes per direction."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.up = self.down = self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_until_complete(server.serve_forever())

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                if upstream:
                    self.up += len(data)
                else:
                    self.down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, True),
                             self._pipe(up_reader, writer, False))

    def snapshot(self) -> tuple[int, int]:
        return self.up, self.down


def wait_listening(port: int, tracker: Tracker, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while tracker.proc.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the coordinator does not listen on {port}")


def device_files(root: Path, devices: int, rows: int, seed: int = 1) -> list[Path]:
    df = pd.read_csv(rotten_tomatoes_path())
    df = df[df["category"].isin(RT_LABELS)].sample(devices * rows, random_state=seed)
    paths = []
    for i in range(devices):
        part = df.iloc[i * rows:(i + 1) * rows]
        path = root / f"device-{i + 1}.csv"
        pd.DataFrame({"text": part["text"], "label": part["category"]}).to_csv(path, index=False)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedpeft-overhead-"))
    certs = make_certs(work / "certs", [], args.devices)
    data = device_files(work, args.devices, args.rows)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(work / "home")}
    gateway = free_port()
    relay = ByteRelay(gateway)
    fedpeft = [sys.executable, "-m", "fedpeft.cli"]
    settings = [f'model.name="{args.model}"', f"federation.rounds={args.rounds}",
                f"train.local_steps={args.steps}", "train.batch_size=8", "eval.subset=100",
                "data.test_size=200", 'data.partitioner="iid"']
    trackers: list[Tracker] = []
    marks: list[tuple[float, int, int]] = []
    try:
        server_cmd = [*fedpeft, "server", "--certs", str(certs.root), "--host", "127.0.0.1",
                      "--port", str(gateway), "--out", str(out)]
        for item in settings:
            server_cmd += ["--set", item]
        trackers.append(spawn(server_cmd, env, out / "coordinator.log"))
        wait_listening(gateway, trackers[0], 120)  # the relay accepts at once: devices must
        for i, path in enumerate(data, start=1):   # not meet a closed upstream (TLS error)
            trackers.append(spawn(
                [*fedpeft, "client", "--superlink", f"127.0.0.1:{relay.port}", "--ca",
                 str(certs.ca_cert), "--key", str(certs.node_key(i)), "--data", str(path),
                 "--threads", "1", "--max-wait", "10", "--isolation", args.isolation,
                 *(["--allow-remote-code"] if args.isolation == "subprocess" else [])],
                env, out / f"device-{i}.log"))
        server = trackers[0].proc
        seen = 0
        while server.poll() is None:
            if all(t.proc.poll() is not None for t in trackers[1:]):
                raise RuntimeError(f"every device exited; see {out}/device-*.log")
            rows = MetricsLog.read(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() \
                else []
            for _ in rows[seen:]:
                marks.append((time.monotonic(), *relay.snapshot()))
            seen = max(seen, len(rows))
            time.sleep(0.05)
        if server.returncode != 0:
            raise RuntimeError(f"fedpeft server failed ({server.returncode}); see {out}")
    finally:
        stop_all(trackers, print)
        shutil.rmtree(work, ignore_errors=True)
    return report(MetricsLog.read(out / "metrics.jsonl"), marks, relay, args)


def report(rows: list[dict], marks: list[tuple[float, int, int]], relay: ByteRelay,
           args: argparse.Namespace) -> dict:
    per_round = []
    for r in range(1, len(rows)):
        row = rows[r]
        per_round.append({
            "round": row["round"], "wall_s": row["wall_s"], "train_s": row["train_s"],
            "eval_s": row["eval_s"],
            "overhead_s": row["wall_s"] - row["eval_s"] - row["train_s"],
            "bytes_up": row["bytes_up"], "bytes_down": row["bytes_down"],
            "wire_up": marks[r][1] - marks[r - 1][1] if r < len(marks) else None,
            "wire_down": marks[r][2] - marks[r - 1][2] if r < len(marks) else None,
        })
    steady = per_round[1:] or per_round
    mean = {k: sum(p[k] for p in steady) / len(steady) for k in
            ("overhead_s", "wall_s", "train_s", "bytes_up", "bytes_down", "wire_up",
             "wire_down")}
    summary = json.loads(Path(args.out, "summary.json").read_text())
    result = {"isolation": args.isolation, "devices": args.devices, "rounds": args.rounds,
              "model": args.model, "adapter_floats": summary.get("adapter_floats"),
              "gateway": {k: v for k, v in summary.items() if k.startswith("fleet_http_")},
              "per_round": per_round, "mean_rounds_2_on": mean,
              "wire_total_up": relay.up, "wire_total_down": relay.down,
              "tcp_connections": relay.connections}
    Path(args.out, "overhead.json").write_text(json.dumps(result, indent=2))
    print("| round | wall s | train s | eval s | overhead s | metrics up/down B | "
          "wire up/down B |\n|---:|---:|---:|---:|---:|---:|---:|")
    for p in per_round:
        print(f"| {p['round']} | {p['wall_s']:.2f} | {p['train_s']:.3f} | {p['eval_s']:.2f} | "
              f"{p['overhead_s']:.2f} | {p['bytes_up']}/{p['bytes_down']} | "
              f"{p['wire_up']}/{p['wire_down']} |")
    print(f"mean of rounds 2..{args.rounds} ({args.isolation}): overhead "
          f"{mean['overhead_s']:.2f} s/round; wire {mean['wire_up']:.0f} B up, "
          f"{mean['wire_down']:.0f} B down vs metrics {mean['bytes_up']:.0f} / "
          f"{mean['bytes_down']:.0f}; whole run on the wire {relay.up} B up, {relay.down} B "
          f"down in {relay.connections} TCP connections")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isolation", choices=("process", "subprocess"), default="process")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rows", type=int, default=60, help="examples per device")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="local steps per round")
    parser.add_argument("--model", default="tiny-bert", choices=("tiny-bert", "minilm-l6"))
    parser.add_argument("--out", default="runs/deploy-overhead")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
