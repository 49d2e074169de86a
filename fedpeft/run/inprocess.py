"""``simulation.engine = "inprocess"``: ``fedpeft simulate`` without Flower's SuperLink and Ray.

The run is the product's round loop (``server/rounds.py``) over the in-process transport
(``server/inprocess.py``): the same sampling, downlinks, client step, wire encoding, reply
validation, aggregation, evaluation, checkpoints and outputs as the ServerApp, called in this
process, one client after another. Start-up is an import and a model load instead of a
SuperLink, Ray and one model per actor, which is what a smoke run or a short sweep cell pays for.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from fedpeft.core.config import FedConfig
from fedpeft.run.launcher import EXIT_FAILED

RUN_LOG = "run.log"  # as the Flower engine's: where the traceback of a crash goes


def run_in_process(cfg: FedConfig, out: Path, resume: bool = False,
                   verbose: bool = False) -> int:
    """The whole run (continued after its last checkpoint when ``resume``); 0 when it finished,
    else :data:`EXIT_FAILED` with the reason in ``OUT/error.json`` (what the CLI reports).
    Torch threads as one actor of the Flower engine (``simulation.threads_per_client``, else
    ``cpus_per_client``), so both engines compute alike. The round loop's log lines go to
    ``OUT/run.log`` (and to the console only when ``verbose``: the CLI prints its own progress
    and results)."""
    from flwr.common.logger import console_handler

    from fedpeft.core.workspace import get_workspace, set_torch_threads
    from fedpeft.server.app import report_error
    from fedpeft.server.inprocess import InProcessTransport
    from fedpeft.server.rounds import new_loop, run_rounds

    handler = logging.FileHandler(out / RUN_LOG, encoding="utf-8")
    flwr_logger = logging.getLogger("flwr")  # the round loop logs through Flower's logger
    flwr_logger.addHandler(handler)
    console_level = console_handler.level
    if not verbose:
        console_handler.setLevel(logging.WARNING)
    try:
        sim = cfg.simulation
        set_torch_threads(sim.threads_per_client or sim.cpus_per_client)
        workspace = get_workspace(cfg)
        loop = new_loop(cfg, workspace, simulation=True)
        transport = InProcessTransport(cfg, loop.method, workspace)
        run_rounds(loop, transport, workspace, out, resume=resume)
        return 0
    except Exception as exc:  # any failure: error.json, as the ServerApp does
        report_error(out, exc)
        handler.stream.write(traceback.format_exc())
        return EXIT_FAILED
    finally:
        console_handler.setLevel(console_level)
        flwr_logger.removeHandler(handler)
        handler.close()
