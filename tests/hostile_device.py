"""A hostile device for tests/test_hostile_deployment.py, run as a script (never imported by a
test): `fedpeft client` with its real key, TLS and training, whose reply is altered after the
honest ClientApp built it. Round r sends ATTACKS[(r - 1) % len(ATTACKS)]: the review's N1 (a
[2**63] manifest), N2 (FLoRA's synced scalar as a list, inf, a string, 1e300) and N3 (a 1 MB
deflate bomb over the expected keys).

    python tests/hostile_device.py CLIENT-ARGS...   (the arguments of `fedpeft client`)
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

N1 = b'{"v":1,"chain":["deflate"],"t":[["w","uint8",[9223372036854775808],"raw"]]}'


def _packed(content: RecordDict, buffer: bytes, manifest: bytes) -> None:
    from fedpeft.core.wire import BYTES_STYPE, MANIFEST, PACKED

    content[PACKED] = ArrayRecord({"data": Array(dtype="uint8", shape=(len(buffer),),
                                                 stype=BYTES_STYPE, data=buffer)})
    content[MANIFEST] = ConfigRecord({"m": manifest})


def n1(content: RecordDict) -> None:
    _packed(content, b"\x00", zlib.compress(N1))


def n3(content: RecordDict) -> None:
    from fedpeft.core.wire import MANIFEST

    doc = json.loads(zlib.decompress(content[MANIFEST]["m"]))
    for entry in doc["t"]:
        entry[1], entry[2], entry[3] = "float32", [1 << 28], "raw"
    doc["chain"] = ["deflate"]
    deflate, zeros = zlib.compressobj(9), bytes(1 << 20)
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    _packed(content, first + block * ((1 << 20) // len(block)) + deflate.flush(),
            zlib.compress(json.dumps(doc).encode()))


def synced(value: object) -> Callable[[RecordDict], None]:
    def attack(content: RecordDict) -> None:
        from fedpeft.core.wire import SCALARS

        scalars = dict(content[SCALARS])
        scalars["flora.synced"] = value
        content[SCALARS] = ConfigRecord(scalars)
    attack.__name__ = f"synced={value!r}"
    return attack


ATTACKS = [n1, synced([1, 2]), synced(float("inf")), synced("7"), synced(1e300), n3]


def main() -> int:
    from fedpeft.client import app as client_app

    from fedpeft.cli import main as cli
    from fedpeft.core.keys import ROUND
    from fedpeft.core.wire import message_scalars
    from fedpeft.deploy import clientexec

    hostile = ClientApp()

    @hostile.train()
    def train(msg: Message, context: Context) -> Message:
        reply = client_app.train(msg, context)  # fedpeft's own, honest reply
        rnd = int(message_scalars(msg.content)[ROUND])
        ATTACKS[(rnd - 1) % len(ATTACKS)](reply.content)
        print(f"hostile device: round {rnd}: sent {ATTACKS[(rnd - 1) % len(ATTACKS)].__name__}",
              file=sys.stderr, flush=True)
        return reply

    clientexec.AppLoader.get = lambda self: hostile  # in place of fedpeft's device_app
    return cli(["client", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
