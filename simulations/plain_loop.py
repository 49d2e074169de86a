"""The yardstick: the same federated workload in one PyTorch process, no Flower and no Ray
(the product's in-process transport, ``server/inprocess.py``).

    python simulations/plain_loop.py [CONFIG] --set federation.rounds=5 --out runs/plain
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpeft.server.inprocess import run_plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run_plain(args.config, args.overrides, args.out)


if __name__ == "__main__":
    main()
