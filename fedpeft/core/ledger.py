"""A device's own privacy: its delta, and its lifetime DP-SGD budget in a ledger file it owns.

Within one run the accountant's history lives in the run's client state, so a new run (or a
resume the coordinator starts afresh) would begin at epsilon 0 again and a coordinator could
spend the same records over and over. ``fedpeft client --epsilon E`` therefore makes E a
lifetime budget: every DP-SGD round of every run is appended to this JSON file before it is
trained, and epsilon is computed over the whole file.

Composition: the histories (sigma, q, steps) of all runs are concatenated and accounted with
Opacus's RDP accountant at the device's current delta (RDP composes; this is tighter than adding
per-run epsilons and never too small). The file says per run: the Flower run id, when it started,
the data file, the sample rate and sigma, the steps trained and the epsilon of that run alone.

Each round gets the noise that E would need over the run's planned rounds (as a per-run budget
would), and a round that would take the lifetime epsilon beyond E is refused: the device replies
"budget spent". A second run thus gets what the first left, at the same noise per round.

The file is changed under an exclusive ``flock`` of ``PATH.lock`` and replaced atomically (write,
fsync, rename), so two device processes sharing one ledger cannot both spend the same budget,
and a crash leaves either the old or the new file. Default location: ``$FLWR_HOME/fedpeft/
privacy-ledger.json`` (``~/.flwr`` when FLWR_HOME is unset), one budget for everything this
user's devices train; ``--ledger PATH`` keeps separate budgets for separate datasets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.core.config import ConfigError, PrivacyConfig

if TYPE_CHECKING:  # fedpeft.core.privacy imports torch: imported where it is used
    from fedpeft.core.privacy import History, Spend

FORMAT = "fedpeft-privacy-ledger/1"
MECHANISM = "rdp"  # the device's own choice, whatever accountant the coordinator names
_EPS_SLACK = 1e-9
DEVICE_DELTA = 1e-5  # a device's delta when it gives none (``fedpeft client --delta``)


def device_privacy(priv: PrivacyConfig, epsilon: float | None, delta: float | None
                   ) -> tuple[PrivacyConfig, str | None]:
    """The privacy settings a device trains under: its own ``epsilon`` budget when it gives one
    (DP-SGD then runs even if the run does not ask for it) and never a delta above its own
    (default :data:`DEVICE_DELTA`): a coordinator's larger delta would weaken the device's
    guarantee (delta 0.5 turns epsilon 3 into about 19 at delta 1e-5), so it is not used.
    Returns the settings and a note for the device's log when the coordinator's delta was
    overruled."""
    own_delta = DEVICE_DELTA if delta is None else float(delta)
    if not 0 < own_delta < 1:
        raise ConfigError(f"this device's delta = {own_delta!r} is out of range: a number in "
                          "(0, 1), well below 1/n for its n examples (e.g. 1e-5)")
    if epsilon is None and not priv.enabled:
        return priv, None
    note = None
    if priv.enabled and priv.delta > own_delta:
        note = (f"the run asks for privacy.delta = {priv.delta:g}; this device keeps its own "
                f"delta = {own_delta:g} (a larger delta would weaken its guarantee)")
    new_delta = min(priv.delta, own_delta) if priv.enabled else own_delta
    new_epsilon = priv.epsilon if epsilon is None else float(epsilon)
    return dataclasses.replace(priv, enabled=True, epsilon=new_epsilon, delta=new_delta), note


def check_device_delta(delta: float, n: int) -> None:
    """A device refuses delta >= 1/n: such a delta allows publishing a whole record."""
    if n < 1 or delta >= 1.0 / n:
        raise ConfigError(f"delta = {delta:g} >= 1/n = {1 / max(n, 1):.3g} for this device's "
                          f"{n} examples: such a delta allows leaking a whole record; give a "
                          f"smaller --delta (e.g. {min(1e-5, 0.1 / max(n, 1)):.1g})")


def default_ledger_path() -> Path:
    home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    return Path(home) / "fedpeft" / "privacy-ledger.json"


class PrivacyLedger:
    """The lifetime budget (``epsilon``, ``delta``) of a device, kept in ``path``; ``run`` names
    the run whose rounds :meth:`spend` records (Flower's run id)."""

    def __init__(self, path: Path, epsilon: float, delta: float, run: str,
                 data: str = "") -> None:
        self.path, self.epsilon, self.delta = Path(path), float(epsilon), float(delta)
        self.run, self.data = str(run), data

    # ---- the file ------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """The ledger's contents (an empty ledger when the file does not exist yet)."""
        if not self.path.exists():
            return {"format": FORMAT, "runs": []}
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("format") != FORMAT or not isinstance(doc["runs"], list):
                raise ValueError(f"format {doc.get('format')!r}")
            self.history(doc)  # every entry parses
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"privacy ledger {self.path} is not a {FORMAT} file ({exc}); "
                              "it records this device's spent budget: restore it, or move it "
                              "away only if no record it covers is still in use") from None
        return doc

    def _write(self, doc: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):  # the rename itself survives a power cut
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self.read()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---- accounting -------------------------------------------------------------------------
    @staticmethod
    def history(doc: dict[str, Any]) -> History:
        """Every run's steps, in order: the lifetime history."""
        from fedpeft.core.privacy import compose

        out: History = []
        for run in doc["runs"]:
            for sigma, q, steps in run["history"]:
                out = compose(out, float(sigma), float(q), int(steps))
        return out

    def spent(self, doc: dict[str, Any] | None = None) -> float:
        """The lifetime epsilon at this ledger's delta."""
        from fedpeft.core.privacy import epsilon_of

        return epsilon_of(self.history(self.read() if doc is None else doc), self.delta,
                          MECHANISM)

    def spend(self, q: float, steps: int, planned_steps: int) -> Spend:
        """Record ``steps`` DP-SGD steps at rate ``q`` with the noise the budget needs over
        ``planned_steps``, or refuse them when they would take the lifetime epsilon beyond it."""
        from fedpeft.core.privacy import Spend, compose, epsilon_of, noise_multiplier

        budget = PrivacyConfig(enabled=True, epsilon=self.epsilon, delta=self.delta,
                               accountant=MECHANISM)
        sigma = noise_multiplier(budget, q, planned_steps)
        with self._locked() as doc:
            lifetime = self.history(doc)
            after = epsilon_of(compose(lifetime, sigma, q, steps), self.delta, MECHANISM)
            if after > self.epsilon * (1 + _EPS_SLACK):
                return Spend(sigma, epsilon_of(lifetime, self.delta, MECHANISM), False)
            run, new = self._run_entry(doc)
            run["history"] = compose([tuple(h) for h in run["history"]], sigma, q, steps)
            run["epsilon"] = epsilon_of(run["history"], self.delta, MECHANISM)
            doc.update(format=FORMAT, accountant=MECHANISM, delta=self.delta,
                       budget=self.epsilon, spent=after)
            if new:
                doc["runs"].append(run)
            self._write(doc)
            return Spend(sigma, after, True)

    def _run_entry(self, doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """This run's entry, and whether it is new (not in the file yet)."""
        for run in doc["runs"]:
            if run.get("run") == self.run:
                return run, False
        return {"run": self.run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "data": self.data, "delta": self.delta, "history": []}, True
