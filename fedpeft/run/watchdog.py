"""The watchdog process of ``fedpeft.run.launcher.Watchdog``: ``python -m fedpeft.run.watchdog
PARENT_PID``, commands on stdin, one per line:

- ``pid PID START``: track this process (started by the parent in a session of its own) and
  every process that descends from it or joins its sessions;
- ``rm PATH``: remove this file or folder after stopping the processes;
- ``done``: the parent stopped everything itself; leave at once, touching nothing.

End of input without ``done``, or a new parent (we were re-parented), means the parent died:
SIGTERM everything tracked, SIGKILL what is left after a grace period, remove the paths, exit.
File descriptors the parent passed (its run folder locks) close only then.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys

from fedpeft.run.launcher import Tracker

GRACE_S = 3.0  # SIGTERM -> SIGKILL; short: the parent is gone and nobody is waiting for a result
POLL_S = 0.25


def watch(parent: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # our own session: no terminal signals anyway
    tracker = Tracker(None, foreign_sessions={os.getsid(0), _session(parent)})
    paths: list[str] = []
    reader = _Commands()
    while True:
        orphaned = os.getppid() != parent
        ready, _, _ = select.select([0], [], [], 0 if orphaned else POLL_S)
        if ready:
            chunk = os.read(0, 65536)
            for kind, rest in reader.feed(chunk):
                if kind == "done":
                    return 0
                if kind == "pid":
                    pid, start = (int(x) for x in rest.split())
                    tracker.adopt(pid, start)
                elif kind == "rm":
                    paths.append(rest)
            if not chunk:
                break  # the parent's end of the pipe closed without "done": it died
        elif orphaned:
            break  # re-parented and nothing left to read: the parent died
        tracker.scan()
    tracker.stop_all(grace_s=GRACE_S)
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    return 0


class _Commands:
    """Splits stdin into (command, argument) pairs; a partial last line waits for the rest."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        pairs = [line.decode(errors="replace").partition(" ") for line in lines if line]
        return [(kind, rest) for kind, _, rest in pairs]


def _session(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1])))
