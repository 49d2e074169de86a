"""The command line as a shell user meets it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    """`fedpeft sweep F --dry-run | head` closes the pipe mid-listing: no traceback, the SIGPIPE
    exit code, as Unix tools end."""
    sweep = ROOT / "simulations" / "sweeps" / "bench_ranks_news.toml"
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "sweep", str(sweep),
                             "--dry-run", "--out", "/nonexistent/never-written"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert first.startswith(b"fedpeft sweep")
    assert "Traceback" not in err and "Exception ignored" not in err, err
