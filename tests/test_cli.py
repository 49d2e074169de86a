"""The command line as a shell user meets it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPE_BUFFER = 64 * 1024  # Linux's default pipe capacity


def _long_sweep(tmp: Path) -> Path:
    """A sweep file whose --dry-run listing is over 200 KB (2,000 cells)."""
    path = tmp / "long.toml"
    path.write_text(f'methods = ["fedit", "ffa-lora"]\nseeds = {list(range(1000))}\n')
    return path


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path: Path) -> None:
    """`fedpeft sweep F --dry-run | head` closes the pipe mid-listing: no traceback, the SIGPIPE
    exit code, as Unix tools end. The listing is made longer than the pipe can hold, so the
    command is still writing when the reader leaves (a short one could finish first)."""
    sweep = _long_sweep(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "sweep", str(sweep),
                             "--dry-run", "--out", str(tmp_path / "never-written")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert first.startswith(b"fedpeft sweep")
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert not (tmp_path / "never-written").exists()


def test_the_long_listing_outgrows_the_pipe(tmp_path: Path) -> None:
    """The premise of the test above: its listing cannot fit in the pipe's buffer."""
    sweep = _long_sweep(tmp_path)
    out = subprocess.run([sys.executable, "-m", "fedpeft.cli", "sweep", str(sweep), "--dry-run",
                          "--out", str(tmp_path / "never-written")], capture_output=True,
                         cwd=ROOT, timeout=120, check=True).stdout
    assert len(out) > 3 * PIPE_BUFFER
