"""The benchmark's measuring parts (process-tree sampler, profile summary) and the CLI's
forked configuration check that keeps torch out of the waiting CLI process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from simulations.benchmark import TreeSampler, summarise_profile

# A parent that starts a child in its own session which allocates ~60 MB and outlives it.
_TREE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c",
                  "import time; x = bytearray(60 * 2**20); time.sleep(3)"],
                 start_new_session=True)
time.sleep(1.5)
"""


def test_sampler_sees_orphaned_descendants_and_their_memory(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _TREE])
    sampler = TreeSampler(proc.pid, period_s=0.1).start()
    proc.wait()
    time.sleep(0.8)  # the child is orphaned now, in another session: still counted
    orphans = [p for p in sampler.tree() if p != proc.pid]
    sampler.stop()
    assert orphans, "the orphaned child left the tree"
    memory = sampler.memory()
    assert memory["peak_processes"] >= 2
    assert memory["peak_rss_mib"] >= 60
    assert memory["peak_pss_mib"] <= memory["peak_rss_mib"] + 1
    assert memory["tree_cpu_s"] >= 0


def test_sampler_records_when_lines_appear(tmp_path: Path) -> None:
    watched = tmp_path / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    sampler = TreeSampler(proc.pid, watch=watched, period_s=0.1, watch_s=0.01).start()

    def seen(n: int) -> None:  # wait for the sampler, however loaded the machine is
        deadline = time.monotonic() + 10
        while len(sampler.line_times) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    watched.write_text("{}\n")
    seen(1)
    time.sleep(0.3)
    watched.write_text("{}\n{}\n")
    seen(2)
    sampler.stop()
    proc.terminate()
    proc.wait()
    assert len(sampler.line_times) == 2
    assert sampler.line_times[1] - sampler.line_times[0] >= 0.3 - 0.05


def test_profile_summary_shares_of_wall_time(tmp_path: Path) -> None:
    raw = tmp_path / "server.raw"
    raw.write_text("main (a.py);poll (b.py) 30\nmain (a.py);work (c.py);inner (c.py) 20\n")
    text = summarise_profile(raw, seconds=2, rate=50)  # 100 samples of wall time
    assert "50 on-CPU samples" in text and "= 50% of one core" in text
    assert " 30.0%  poll (b.py)" in text
    assert " 50.0%  main (a.py)" in text  # inclusive: counted once per stack
    assert " 20.0%  work (c.py)" in text


def test_cli_starts_without_torch() -> None:
    """The CLI reads the run's files by the names the server writes (fedpeft.core.runfiles)
    without importing torch: a waiting CLI must not hold the ML stack."""
    code = "import sys, fedpeft.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_forked_preflight_reports_config_errors(tmp_path: Path) -> None:
    """In a fresh CLI process (no torch yet) the check runs in a forked child: its
    ConfigError must still reach the user as one clear message with exit status 2."""
    out = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "simulate", "--out", str(tmp_path),
         "--set", 'model.name="tiny-bert"', "--set", 'model.target_modules=["nope"]'],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr
    assert "model.target_modules = ['nope'] matched no layer" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_workspace_reuse_and_its_ablation() -> None:
    """An actor keeps one workspace (model, tokenised partitions) across virtual clients; with
    simulation.reuse_workspace = false each client round builds its own (the 'before')."""
    from fedpeft.core.config import load_config
    from fedpeft.core.workspace import get_workspace
    from tests.helpers import TINY

    reuse = load_config(None, TINY)
    assert get_workspace(reuse) is get_workspace(reuse)
    fresh = load_config(None, [*TINY, "simulation.reuse_workspace=false"])
    first, second = get_workspace(fresh), get_workspace(fresh)
    assert first is not second and first is not get_workspace(reuse)
    assert first.adapter_model(4) is not second.adapter_model(4)


def test_derived_figures_include_tokens_per_second() -> None:
    from simulations.benchmark import derive

    sim = {"startup_s": 5.0, "round_s": [9.0, 4.0, 6.0], "server_round_s": [8.0, 3.0, 5.0],
           "train_s": [7.0, 2.0, 3.0], "train_tokens": [999, 400, 600], "peak_rss_mib": 1.0,
           "peak_pss_mib": 1.0}
    plain = {"round_s": [8.0, 4.0, 4.0], "train_s": [6.0, 2.0, 2.0]}
    figures = derive({"simulation": sim, "plain": plain})
    assert figures["tokens_per_s"] == (400 + 600) / (2.0 + 3.0)  # round 1 left out
    assert figures["overhead_ratio"] == 5.0 / 4.0
    old = derive({"simulation": {k: v for k, v in sim.items() if k != "train_tokens"},
                  "plain": plain})
    assert old["tokens_per_s"] is None  # results from before the column
