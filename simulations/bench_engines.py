"""Wall time of ``fedpeft simulate`` with each ``simulation.engine``, as a user sees it: a fresh
CLI process from launch to exit, the engines alternating (so a load spike from other processes
hits both alike), on the smoke config by default (tiny-bert, 6 clients, 3 per round, 2 rounds):

    python -m simulations.bench_engines --repeats 3
    python -m simulations.bench_engines --set federation.rounds=3 --repeats 1

Also records the machine's 1-minute load average at each start: on a shared machine, quote the
ratio, not the seconds. Writes ``simulations/results/precision/bench_engines.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOKE = ['model.name="tiny-bert"', "federation.clients=6", "federation.clients_per_round=3",
         "federation.rounds=2", "train.local_steps=2", "train.batch_size=8", "eval.subset=100",
         'data.partitioner="iid"', "data.test_size=200"]
ENGINES = ("inprocess", "flower")
RESULTS = Path(__file__).parent / "results" / "precision"


def one_run(engine: str, overrides: list[str], folder: Path) -> dict:
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--out", str(folder / engine)]
    for item in (*overrides, f'simulation.engine="{engine}"'):
        cmd += ["--set", item]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    summary_path = folder / engine / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"engine": engine, "rc": proc.returncode, "wall_s": wall, "load1": load,
            "final_accuracy": summary.get("final_accuracy"),
            "rounds_wall_s": summary.get("rounds_wall_s"), "tail": proc.stdout[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(RESULTS / "bench_engines.json"))
    args = parser.parse_args()
    os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                      FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-engines-") as tmp:
        os.environ.setdefault("FLWR_HOME", str(Path(tmp) / "flwr"))
        for rep in range(args.repeats):
            for engine in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
                row = one_run(engine, [*SMOKE, *args.overrides], Path(tmp) / str(rep))
                runs.append(row)
                print(f"{engine:9s} rep {rep}: {row['wall_s']:.1f} s (rc {row['rc']}, load "
                      f"{row['load1']:.1f}, final accuracy {row['final_accuracy']})", flush=True)
    median = {e: statistics.median(r["wall_s"] for r in runs if r["engine"] == e)
              for e in ENGINES}
    result = {"overrides": [*SMOKE, *args.overrides], "median_wall_s": median,
              "ratio": median["inprocess"] / median["flower"], "runs": runs}
    print(f"median wall: inprocess {median['inprocess']:.1f} s, flower {median['flower']:.1f} s"
          f" ({result['ratio']:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
