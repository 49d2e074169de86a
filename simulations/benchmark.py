"""Simulation performance: the real Flower simulation against a plain single-process loop.

For each client count, in one invocation: ``fedpeft simulate`` (SuperLink + Flower's simulation
engine on Ray) with the default experiment's workload (MiniLM-L6, Rotten Tomatoes, 10 sampled per
round, default local steps) for a few rounds, then ``simulations/plain_loop.py`` with the same
config (same sampled clients, same data, same seeds) in one PyTorch process using all cores.

Measured per client count:

- start-up: launch of ``fedpeft simulate`` until the server is ready for round 1 (everything
  before round 0's evaluation ended, minus that evaluation);
- steady round wall time: rounds 2.. (round 1 pays for starting actors, building the model in
  each and tokenising partitions). Taken between consecutive metrics.jsonl rows as they appear,
  so it includes all the server's per-round work (checkpoint, messages, aggregation); the
  evaluation's ``eval_s`` is subtracted. ``eval.every`` is set past the last round, so only
  round 0 and the last round evaluate at all;
- summed client training time: ``train_s`` (forward/backward/optimizer only) of the round;
- peak memory of the whole process tree: every process descended from the launched command, also
  orphaned ones (Ray), sampled from ``/proc`` every 0.5 s; both RSS summed (counts shared pages
  once per process) and PSS summed (shares them out: the memory the tree really holds);
- overhead ratio: steady simulation round / steady plain-loop round.

    python -m simulations.benchmark --clients 10 50 100 200 --rounds 4

Each client count is merged into ``--out``.json/.md as it finishes (re-run a size to replace
it), so sizes can be run as separate invocations. ``--tag`` names the configuration measured
(e.g. ``before``/``after``); ``--set k=v`` adds config overrides to both runs, ``--config`` a
TOML both start from (the causal-LM path: ``--config simulations/configs/smollm2-rt.toml``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.server.reporting import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "simulations" / "results" / "benchmark" / "results"
WORK = ROOT / "runs" / "benchmark"
PAGE = os.sysconf("SC_PAGE_SIZE")
NO_EVAL = 1000  # eval.every past the last round: only round 0 and the last round evaluate


def overrides(clients: int, rounds: int, extra: list[str]) -> list[str]:
    """The default experiment at ``clients`` clients; evaluation only at round 0 and the end."""
    return [f"federation.clients={clients}", f"federation.rounds={rounds}",
            f"eval.every={NO_EVAL}", *extra]


# ---------------------------------------------------------------- process-tree memory sampler


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """Live processes: pid -> (ppid, session id, CPU ticks used); zombies excluded."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]),
                                      int(fields[11]) + int(fields[12]))  # utime + stime
    return table


def _busy_ticks() -> int:
    """CPU ticks the whole machine spent busy since boot (all processes, all cores)."""
    with open("/proc/stat", "rb") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in bytes; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            rss = int(fh.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


def _name(pid: int) -> str:
    """A short name for ``pid``: its command line's first words (Ray names its workers)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            words = fh.read().replace(b"\0", b" ").decode(errors="replace").split()
    except OSError:
        return f"pid {pid}"
    short = [Path(w).name if "/" in w else w for w in words[:3]]
    return " ".join(short)[:80] or f"pid {pid}"


@dataclass
class TreeSampler:
    """Samples the memory of ``root``'s process tree every ``period_s`` and the times at which
    new lines appear in ``watch`` (metrics.jsonl) every ``watch_s``, in a background thread.

    The tree: descendants of ``root`` plus every process in a session one of them belongs to
    (Flower's SuperExec starts its own session; Ray's daemons stay in it even when orphaned)."""

    root: int
    watch: Path | None = None
    period_s: float = 0.5
    watch_s: float = 0.05
    peak_rss: int = 0
    peak_pss: int = 0
    peak_single_rss: int = 0
    peak_procs: int = 0
    samples: int = 0
    at_peak: list[tuple[str, int, int]] = field(default_factory=list)
    line_times: list[float] = field(default_factory=list)
    _cpu: dict[int, int] = field(default_factory=dict)  # pid -> last CPU ticks seen
    _busy0: int = field(default_factory=_busy_ticks)
    _busy1: int = 0
    _sessions: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        next_sample = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_sample:
                self.sample()
                next_sample = now + self.period_s
            self._watch_lines()
            self._stop.wait(self.watch_s)

    def _watch_lines(self) -> None:
        if self.watch is None:
            return
        try:
            with open(self.watch, "rb") as fh:
                lines = fh.read().count(b"\n")
        except OSError:
            return
        now = time.monotonic()
        while len(self.line_times) < lines:
            self.line_times.append(now)

    def tree(self) -> list[int]:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        members = {self.root} if self.root in table else set()
        todo = list(members)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in members:
                    members.add(child)
                    todo.append(child)
        self._sessions |= {table[p][1] for p in members}
        members |= {p for p, (_, sid, _) in table.items() if sid in self._sessions}
        members.discard(os.getpid())
        self._cpu.update({p: table[p][2] for p in members})
        self._busy1 = _busy_ticks()
        return sorted(members)

    def sample(self) -> None:
        pids = self.tree()
        sizes = [_memory(p) for p in pids]
        self.samples += 1
        if sum(p for _, p in sizes) > self.peak_pss:
            self.at_peak = [(_name(pid), rss, pss) for pid, (rss, pss)
                            in zip(pids, sizes, strict=True)]
        self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes))
        self.peak_pss = max(self.peak_pss, sum(p for _, p in sizes))
        self.peak_single_rss = max([self.peak_single_rss, *(r for r, _ in sizes)])
        self.peak_procs = max(self.peak_procs, len(pids))

    def cpu(self) -> dict[str, float]:
        """CPU seconds of the tree, and of everything else on the machine meanwhile (other
        work that competed for the cores; processes of the tree that ended between two samples
        lose their last half second to it)."""
        tick = os.sysconf("SC_CLK_TCK")
        tree = sum(self._cpu.values()) / tick
        return {"tree_cpu_s": tree, "other_cpu_s": (self._busy1 - self._busy0) / tick - tree}

    def memory(self) -> dict[str, Any]:
        mib = 1024 * 1024
        return {"peak_rss_mib": self.peak_rss / mib, "peak_pss_mib": self.peak_pss / mib,
                "peak_single_rss_mib": self.peak_single_rss / mib,
                "peak_processes": self.peak_procs, "memory_samples": self.samples,
                **self.cpu(),
                "at_peak": [{"process": n, "rss_mib": r / mib, "pss_mib": p / mib}
                            for n, r, p in sorted(self.at_peak, key=lambda x: -x[2])]}


# ---------------------------------------------------------------------------------- the runs


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _launch(cmd: list[str], log: Path, watch: Path | None, timeout_s: float,
            hook: Callable[[TreeSampler], object] | None = None) -> tuple[int, float, TreeSampler]:
    """Run ``cmd`` in its own session with output to ``log``; sample its tree while it runs
    (``hook(sampler)`` runs in a thread meanwhile). Returns (exit code, launch time
    (monotonic), sampler)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")])}
    with open(log, "wb") as fh:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid, watch).start()
        if hook is not None:
            threading.Thread(target=hook, args=(sampler,), daemon=True).start()
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # fedpeft simulate stops its whole tree on SIGTERM
            code = proc.wait()
        sampler.sample()
        sampler.stop()
    return code, t0, sampler


def run_simulation(clients: int, rounds: int, extra: list[str], work: Path,
                   timeout_s: float, profile_s: float = 0.0,
                   config: str | None = None) -> dict[str, Any]:
    """``fedpeft simulate`` with the benchmark's config; timings from metrics.jsonl rows and
    the moments they appeared. ``profile_s`` > 0: py-spy the server, one actor and the CLI for
    that long once round 1 has finished (see :func:`profile_steady`)."""
    out = work / f"sim-{clients}"
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", *([config] if config else []),
           "--out", str(out)]
    for item in overrides(clients, rounds, extra):
        cmd += ["--set", item]
    work.mkdir(parents=True, exist_ok=True)
    hook = functools.partial(profile_steady, seconds=profile_s, work=work / f"profile-{clients}")
    code, t0, sampler = _launch(cmd, work / f"sim-{clients}.log", metrics, timeout_s,
                                hook if profile_s > 0 else None)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() \
        else []
    if code != 0 or len(rows) != rounds + 1:
        raise RuntimeError(f"fedpeft simulate failed (exit {code}, {len(rows)} rows); see "
                           f"{work / f'sim-{clients}.log'}")
    seen = [t - t0 for t in sampler.line_times]
    # Round k's row appears after: round k-1's checkpoint, round k's training, its evaluation.
    cycle = [seen[k] - seen[k - 1] - (rows[k].get("eval_s") or 0.0) for k in range(1, len(rows))]
    server = [rows[k]["wall_s"] - (rows[k].get("eval_s") or 0.0) for k in range(1, len(rows))]
    return {
        "command": " ".join(cmd[1:]),
        "startup_s": seen[0] - (rows[0].get("eval_s") or 0.0),
        "round_s": cycle,
        "server_round_s": server,
        "train_s": [rows[k]["train_s"] for k in range(1, len(rows))],
        "train_tokens": [rows[k].get("train_tokens", 0) for k in range(1, len(rows))],
        "eval_s": [r.get("eval_s") for r in rows],
        "total_s": sampler.line_times[-1] - t0 if sampler.line_times else None,
        **sampler.memory(),
    }


def run_plain_loop(clients: int, rounds: int, extra: list[str], work: Path,
                   timeout_s: float, config: str | None = None) -> dict[str, Any]:
    """``simulations/plain_loop.py`` with the same config: one process, all cores."""
    out = work / f"plain-{clients}"
    cmd = [sys.executable, str(ROOT / "simulations" / "plain_loop.py"),
           *([config] if config else []), "--out", str(out)]
    for item in overrides(clients, rounds, extra):
        cmd += ["--set", item]
    work.mkdir(parents=True, exist_ok=True)
    code, _, sampler = _launch(cmd, work / f"plain-{clients}.log", None, timeout_s)
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if code != 0 or len(rows) != rounds + 1:
        raise RuntimeError(f"plain loop failed (exit {code}); see {work}/plain-{clients}.log")
    return {
        "command": " ".join(cmd[1:]),
        # the same round loop as the Flower run: its wall time without the evaluation
        "round_s": [rows[k]["wall_s"] - (rows[k].get("eval_s") or 0.0)
                    for k in range(1, len(rows))],
        "train_s": [rows[k]["train_s"] for k in range(1, len(rows))],
        "eval_s": [r.get("eval_s") for r in rows],
        **sampler.memory(),
    }


def measure(clients: int, rounds: int, extra: list[str], work: Path,
            timeout_s: float, config: str | None = None) -> dict[str, Any]:
    """Both runs for one client count and the derived figures (steady = rounds 2..)."""
    sim = run_simulation(clients, rounds, extra, work, timeout_s, config=config)
    plain = run_plain_loop(clients, rounds, extra, work, timeout_s, config=config)
    return derive({"clients": clients, "rounds": rounds, "config": config,
                   "overrides": overrides(clients, rounds, extra),
                   "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "simulation": sim, "plain": plain})


def derive(result: dict[str, Any]) -> dict[str, Any]:
    """The table's figures from a result's raw per-round lists. Steady figures are medians of
    rounds 2..R (robust to a round slowed by other work on the shared cores; the means are
    kept as ``*_mean``)."""
    sim, plain = result["simulation"], result["plain"]
    steady = {"steady_round_s": sim["round_s"][1:],
              "steady_server_round_s": sim["server_round_s"][1:],
              "steady_train_s": sim["train_s"][1:],
              "plain_steady_round_s": plain["round_s"][1:],
              "plain_steady_train_s": plain["train_s"][1:]}
    figures: dict[str, Any] = {"startup_s": sim["startup_s"], "round1_s": sim["round_s"][0],
                               "peak_rss_mib": sim["peak_rss_mib"],
                               "peak_pss_mib": sim["peak_pss_mib"]}
    for key, values in steady.items():
        figures[key], figures[f"{key}_mean"] = _median(values), _mean(values)
    for suffix in ("", "_mean"):
        ours, plain_s = figures[f"steady_round_s{suffix}"], figures[f"plain_steady_round_s{suffix}"]
        figures[f"overhead_ratio{suffix}"] = ours / plain_s if ours and plain_s else None
    tokens, seconds = sum(sim.get("train_tokens", [])[1:]), sum(sim["train_s"][1:])
    figures["tokens_per_s"] = tokens / seconds if tokens and seconds else None
    return {**result, **figures}


# -------------------------------------------------------------------------------- profiling

PROFILED = {"server": "flwr-simulation", "actor": "ray::ClientAppActor", "cli": "fedpeft.cli"}


def profile_steady(sampler: TreeSampler, *, seconds: float, work: Path) -> None:
    """Once round 1's row is written, record ``seconds`` of on-CPU Python stacks (py-spy,
    raw format, 50 Hz, non-blocking) of the ServerApp/simulation process, one Ray actor and
    the CLI process, concurrently."""
    deadline = time.monotonic() + 600
    while len(sampler.line_times) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    work.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    procs = []
    for role, pattern in PROFILED.items():
        pid = next((p for p in sampler.tree() if pattern in _name(p)), None)
        if pid is None:
            continue
        cmd = [str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50",
               "--nonblocking", "--nolineno", "-f", "raw", "-o", str(work / f"{role}.raw")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    for proc in procs:
        proc.wait()


def summarise_profile(path: Path, seconds: float, rate: int = 50, top: int = 12) -> str:
    """Top functions of a py-spy raw file by own (leaf) and by inclusive samples, as text.
    Percentages are of wall time (``seconds * rate`` samples per thread), so a process that is
    busy 30% of the time shows leaf entries adding up to 30%."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    wall = seconds * rate
    out = [f"{path.stem}: {total} on-CPU samples in {seconds:g} s at {rate} Hz "
           f"(= {total / wall:.0%} of one core)", "  own (leaf) time:"]
    out += [f"    {100 * n / wall:5.1f}%  {name}" for name, n in own.most_common(top)]
    out.append("  inclusive time:")
    out += [f"    {100 * n / wall:5.1f}%  {name}" for name, n in incl.most_common(top)]
    return "\n".join(out)


# -------------------------------------------------------------------------------- reporting

COLUMNS = (
    ("clients", "clients", "{}"),
    ("startup_s", "start-up s", "{:.1f}"),
    ("round1_s", "round 1 s", "{:.1f}"),
    ("steady_round_s", "steady round s", "{:.2f}"),
    ("steady_train_s", "train_s / round (sum)", "{:.2f}"),
    ("plain_steady_round_s", "plain round s", "{:.2f}"),
    ("plain_steady_train_s", "plain train_s", "{:.2f}"),
    ("overhead_ratio", "overhead ratio", "{:.2f}"),
    ("overhead_ratio_mean", "ratio of means", "{:.2f}"),
    ("tokens_per_s", "tokens/s per client", "{:.0f}"),
    ("peak_rss_mib", "peak RSS MiB (tree)", "{:.0f}"),
    ("peak_pss_mib", "peak PSS MiB (tree)", "{:.0f}"),
)

NOTES = (
    "Steady = median of rounds 2..R (round 1 starts the actors, builds the model in each and "
    "tokenises partitions; ratio of means: the same with means). Round s: between consecutive "
    "metrics.jsonl rows of the Flower run (checkpoint, messages, aggregation included), "
    "evaluation (only at round 0 and the last round: "
    f"eval.every={NO_EVAL}) subtracted. train_s: forward/backward/optimizer summed over the "
    "round's clients (the simulation's actors run in parallel, so it can exceed the round). "
    "Tokens/s per client: the steady rounds' training tokens (padding excluded) over their "
    "train_s: one client's training throughput. "
    "Plain: simulations/plain_loop.py with the same config (same clients, data and seeds), one "
    "process, torch threads = cores, round time without evaluation. Overhead ratio = steady "
    "round / plain round. Memory: the whole process tree of `fedpeft simulate` (CLI, SuperLink, "
    "SuperExec, flwr-simulation, Ray daemons and workers), sampled every 0.5 s; RSS counts "
    "shared pages once per process, PSS shares them out. A 2-core machine shared with other "
    "work: timings vary between runs."
)


def markdown(results: dict[str, dict[str, Any]]) -> str:
    parts = ["# Simulation benchmark", ""]
    for tag in sorted(results, key=lambda t: (not t.startswith("before"), t)):
        by_size = results[tag]
        rows = [by_size[k] for k in sorted(by_size, key=int)]
        parts += [f"## {tag}", "", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        for row in rows:
            cells = [fmt.format(row[key]) if row.get(key) is not None else "-"
                     for key, _, fmt in COLUMNS]
            parts.append("| " + " | ".join(cells) + " |")
        extra = sorted({o for r in rows for o in r["overrides"]
                        if not o.startswith(("federation.clients=", "federation.rounds=",
                                             "eval.every="))})
        rounds = sorted({r["rounds"] for r in rows})
        parts += ["", f"Rounds per run: {rounds}; extra overrides: {extra or 'none'}.", ""]
    parts += [NOTES, ""]
    return "\n".join(parts)


def merge(out: Path, tag: str, new: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    path = out.with_suffix(".json")
    results: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault(tag, {}).update({str(r["clients"]): r for r in new})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)
    out.with_suffix(".md").write_text(markdown(results))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a fedpeft TOML for both runs (default: the default "
                        "experiment), e.g. simulations/configs/smollm2-rt.toml")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 3: round 1 "
                        "is excluded from the steady state)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results path without suffix (.json and .md are written)")
    parser.add_argument("--tag", default="current", help="name of the configuration measured")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config override for both runs")
    parser.add_argument("--work", type=Path, default=WORK, help="run folders and logs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from .json")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="instead of the table: one simulation per client count, py-spy "
                        "for SECONDS after round 1, summary to --out.profile.txt")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    if args.report_only:
        path = args.out.with_suffix(".json")
        results = {tag: {n: derive(r) for n, r in by_size.items()}
                   for tag, by_size in json.loads(path.read_text()).items()}
        write_json_atomic(path, results)
        args.out.with_suffix(".md").write_text(markdown(results))
        print(markdown(results))
        return
    if args.profile > 0:
        profile(args)
        return
    for clients in args.clients:
        result = measure(clients, args.rounds, args.extra, args.work, args.timeout, args.config)
        merge(args.out, args.tag, [result])
        brief = {k: v for k, v in result.items() if k not in ("simulation", "plain")}
        print(json.dumps(brief), flush=True)
    print(args.out.with_suffix(".md").read_text())


def profile(args: argparse.Namespace) -> None:
    """Profiled simulation runs (py-spy slows what it samples: not used for the table)."""
    parts = []
    for clients in args.clients:
        sim = run_simulation(clients, args.rounds, args.extra, args.work, args.timeout,
                             profile_s=args.profile, config=args.config)
        folder = args.work / f"profile-{clients}"
        settings = overrides(clients, args.rounds, args.extra)
        rounds = [round(x, 2) for x in sim["round_s"]]
        train = [round(x, 2) for x in sim["train_s"]]
        parts.append(f"## {clients} clients, overrides {settings}\n"
                     f"round s {rounds}, train_s {train}\n")
        parts += [summarise_profile(folder / f"{role}.raw", args.profile) + "\n"
                  for role in PROFILED if (folder / f"{role}.raw").exists()]
    text = "\n".join(parts)
    args.out.with_suffix(".profile.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
