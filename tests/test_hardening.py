"""Hardening from the security review (issue 16, findings 3-7): non-finite config values, bounded
certificate lifetimes, damaged checkpoints, a gateway that caps and streams request bodies, a
finite round timeout for deployments, no remote code or fault injection on real devices, and
device-made key pairs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import stat
import subprocess
import sys
import threading
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedpeft.core.config import SECTIONS, ConfigError, load_config

# ----------------------------------------------------------------- 3. non-finite config values


def _float_keys() -> list[str]:
    keys = []
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls) if hints[f.name] is float]
    return keys


FLOAT_KEYS = _float_keys()


def test_the_config_has_float_options() -> None:
    assert {"federation.max_update_norm", "federation.round_timeout_s", "privacy.epsilon",
            "faults.crash_fraction"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_option_refuses_non_finite_values(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key} = .*not a finite number"):
        load_config(None, [f"{key}={value}"])


def test_non_finite_values_from_a_toml_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nmax_update_norm = nan\n")
    with pytest.raises(ConfigError, match=r"federation\.max_update_norm = nan"):
        load_config(path)


def test_infinite_epsilon_points_to_privacy_enabled() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.enabled = false"):
        load_config(None, ["privacy.epsilon=inf"])


def test_cli_reports_a_non_finite_value_without_a_traceback(capsys) -> None:
    from fedpeft.cli import main

    assert main(["simulate", "--set", "faults.crash_fraction=nan"]) == 2
    err = capsys.readouterr().err
    assert "faults.crash_fraction = nan" in err and "Traceback" not in err


@pytest.mark.parametrize("days", [0, 3651, 1_000_000])
def test_certs_days_out_of_range_is_one_clear_error(tmp_path: Path, days: int, capsys) -> None:
    from fedpeft.cli import main

    assert main(["certs", str(tmp_path / "pki"), "--days", str(days)]) == 2
    err = capsys.readouterr().err
    assert f"--days {days}" in err and "3650" in err
    assert not (tmp_path / "pki" / "ca.key").exists()


def test_certs_at_the_longest_validity(tmp_path: Path) -> None:
    from cryptography import x509

    from fedpeft.deploy.certs import MAX_DAYS, make_certs

    paths = make_certs(tmp_path, [], nodes=0, days=MAX_DAYS)
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert MAX_DAYS <= span.days <= MAX_DAYS + 1


def _checkpoint(tmp_path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from fedpeft.server.checkpoint import checkpoint_path

    path = checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    save_file(tensors, str(path), metadata={"fedpeft": json.dumps(meta)})
    return path


def _meta() -> dict:
    return {"format": 1, "round": 2, "scalars": {}, "metrics": [],
            "config": load_config().to_dict(), "strategy": {}, "keys": ["w"]}


@pytest.mark.parametrize("missing", ["keys", "round", "scalars", "metrics", "config"])
def test_checkpoint_without_a_metadata_key_names_file_and_key(tmp_path: Path,
                                                              missing: str) -> None:
    from fedpeft.server.checkpoint import CheckpointError, load_checkpoint

    meta = _meta()
    del meta[missing]
    path = _checkpoint(tmp_path, meta, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=rf"{path}.*'{missing}'"):
        load_checkpoint(tmp_path)


def test_checkpoint_without_a_listed_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    from fedpeft.server.checkpoint import CheckpointError, load_checkpoint

    meta = {**_meta(), "keys": ["w", "lora_B"]}
    path = _checkpoint(tmp_path, meta, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=rf"{path}.*'lora_B'"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("bad", [{"round": "two"}, {"keys": "w"}, {"scalars": [1]}])
def test_checkpoint_with_mistyped_metadata_is_refused(tmp_path: Path, bad: dict) -> None:
    from fedpeft.server.checkpoint import CheckpointError, load_checkpoint

    path = _checkpoint(tmp_path, {**_meta(), **bad}, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------- 4. gateway request-body cap

_GATEWAY = r"""
import socket, sys, threading, time
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from fedpeft.deploy.gateway import FleetGateway

def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

async def sink(request):  # a SuperLink stand-in that streams and counts what reaches it
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
    return PlainTextResponse(str(n))

up_port, gw_port = port(), port()
app = Starlette(routes=[Route("/{p:path}", sink, methods=["POST"])])
up = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=up_port, log_level="warning"))
threading.Thread(target=up.run, daemon=True).start()
while not up.started:
    time.sleep(0.05)
gateway = FleetGateway(f"http://127.0.0.1:{up_port}", False, "127.0.0.1", gw_port)
gateway.start()
print(gw_port, flush=True)
sys.stdin.read()
"""
MiB = 2**20


def _peak_rss(pid: int) -> int:
    """Peak resident memory (VmHWM) of a process, in bytes: it catches a body held only briefly."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _post(port: int, headers: str, chunks: typing.Iterable[bytes] = ()) -> tuple[int, bytes]:
    """A raw HTTP/1.1 POST to the fleet API; the reply is read in a thread while the body is
    still being sent (a server that answers early and closes would otherwise reset it away)."""
    reply: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        reader = threading.Thread(target=lambda: reply.append(_read_reply(sock)), daemon=True)
        sock.sendall(f"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: gw\r\n{headers}\r\n"
                     .encode())
        reader.start()
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                if reply:
                    break
        except OSError:  # the gateway closed the connection after answering
            pass
        reader.join(20)
    assert reply and reply[0], "no reply from the gateway"
    head, _, body = reply[0].partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _read_reply(sock: socket.socket) -> bytes:
    """Status line, headers and the Content-Length bytes of body (what arrived of them)."""
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data and (part := sock.recv(65536)):
            data += part
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                       if line.startswith(b"content-length:")), 0)
        while len(body) < length and (part := sock.recv(65536)):
            body += part
        data = head + b"\r\n\r\n" + body
    return data


def _chunked(total: int, block: int = MiB) -> typing.Iterator[bytes]:
    piece = b"x" * block
    for _ in range(total // block):
        yield b"%x\r\n" % block + piece + b"\r\n"
    yield b"0\r\n\r\n"


@pytest.fixture
def gateway_proc() -> typing.Iterator[tuple[subprocess.Popen, int]]:
    proc = subprocess.Popen([sys.executable, "-c", _GATEWAY], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        yield proc, port
    finally:
        proc.kill()
        proc.wait(10)


def test_gateway_streams_an_ordinary_body_to_the_superlink(gateway_proc) -> None:
    _, port = gateway_proc
    status, body = _post(port, f"Content-Length: {3 * MiB}\r\n", [b"y" * (3 * MiB)])
    assert (status, body) == (200, str(3 * MiB).encode())
    status, body = _post(port, "Transfer-Encoding: chunked\r\n", _chunked(2 * MiB))
    assert (status, body) == (200, str(2 * MiB).encode())


def test_gateway_refuses_a_declared_oversize_body_before_reading_it(gateway_proc) -> None:
    from fedpeft.deploy.gateway import MAX_BODY_BYTES

    _, port = gateway_proc
    status, _ = _post(port, f"Content-Length: {MAX_BODY_BYTES + 1}\r\n")  # no body sent at all
    assert status == 413


def test_gateway_cuts_off_a_chunked_oversize_body_without_buffering_it(gateway_proc) -> None:
    from fedpeft.deploy.gateway import MAX_BODY_BYTES

    proc, port = gateway_proc
    assert _post(port, "Transfer-Encoding: chunked\r\n", _chunked(MiB))[0] == 200  # warm up
    before = _peak_rss(proc.pid)
    size = 3 * MAX_BODY_BYTES
    status, _ = _post(port, "Transfer-Encoding: chunked\r\n", _chunked(size))
    grown = _peak_rss(proc.pid) - before
    assert status == 413
    assert grown < 48 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB for a {size // MiB} MiB body"


# -------------------------------------------------------- 5. a finite round timeout to deploy

TINY_DEPLOY = ['model.name="tiny-bert"', "data.test_size=200"]


@pytest.mark.parametrize(("sets", "expected"), [([], 600.0),
                                                (["federation.round_timeout_s=30"], 30.0),
                                                (["federation.round_timeout_s=0"], 0.0)])
def test_server_waits_600_s_per_round_unless_the_config_says(sets: list[str],
                                                             expected: float) -> None:
    from fedpeft.deploy.coordinator import ServerOptions, deployment_config

    opts = ServerOptions(insecure=True, clients=2, overrides=[*TINY_DEPLOY, *sets])
    assert deployment_config(opts, 0).federation.round_timeout_s == expected


def test_server_round_timeout_from_a_toml_file_is_kept(tmp_path: Path) -> None:
    from fedpeft.deploy.coordinator import ServerOptions, deployment_config

    path = tmp_path / "c.toml"
    path.write_text("[federation]\nround_timeout_s = 0.0\n")
    opts = ServerOptions(config=str(path), insecure=True, clients=2, overrides=TINY_DEPLOY)
    assert deployment_config(opts, 0).federation.round_timeout_s == 0.0


def test_server_help_states_the_round_timeout(capsys) -> None:
    from fedpeft.cli import main

    with pytest.raises(SystemExit):
        main(["server", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "federation.round_timeout_s" in out and "600 s" in out


@pytest.mark.parametrize(("flag", "value"), [("--timeout", "nan"), ("--timeout", "-1"),
                                             ("--max-body-mb", "inf"), ("--max-body-mb", "0")])
def test_server_refuses_bad_numbers_in_flags(tmp_path: Path, flag: str, value: str,
                                             capsys) -> None:
    from fedpeft.cli import main

    assert main(["server", "--insecure", "--clients", "1", "--out", str(tmp_path), flag,
                 value]) == 2
    assert f"{flag} {float(value)}: expected a positive number" in capsys.readouterr().err


# ---------------------------------------- 6. no fault injection or remote code on real devices


@pytest.mark.parametrize("setting", ["faults.crash=[0]", "faults.nan_fraction=0.5",
                                     "faults.redraw=true"])
def test_server_refuses_fault_injection(tmp_path: Path, setting: str, capsys) -> None:
    from fedpeft.cli import main

    assert main(["server", "--insecure", "--clients", "2", "--out", str(tmp_path / "out"),
                 "--set", setting]) == 2
    err = capsys.readouterr().err
    assert setting.split("=")[0] in err and "fault injection is for `fedpeft simulate` only" in err
    assert not (tmp_path / "out").exists()


def test_server_resume_refuses_a_run_with_fault_injection(tmp_path: Path, capsys) -> None:
    from fedpeft.cli import main
    from fedpeft.core.config import to_toml

    cfg = load_config(None, ["federation.clients=2", "federation.clients_per_round=2",
                             "faults.crash=[1]"])
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    assert main(["server", "--insecure", "--clients", "2", "--resume", str(tmp_path)]) == 2
    assert "faults.crash: fault injection" in capsys.readouterr().err


def _csv(path: Path) -> Path:
    path.write_text('text,label\n"good",fresh\n"bad",rotten\n')
    return path


def test_client_refuses_subprocess_isolation_without_allow_remote_code(tmp_path: Path,
                                                                       capsys) -> None:
    from fedpeft.cli import main

    rc = main(["client", "--superlink", "127.0.0.1:9", "--insecure", "--data",
               str(_csv(tmp_path / "d.csv")), "--isolation", "subprocess", "--max-wait", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-remote-code" in err and "run code" in err


def test_subprocess_isolation_with_allow_remote_code_warns(tmp_path: Path) -> None:
    from fedpeft.deploy.device import ClientOptions, check_isolation

    lines: list[str] = []
    opts = ClientOptions("127.0.0.1:9", tmp_path, isolation="subprocess", allow_remote_code=True)
    check_isolation(opts, lines.append)
    assert len(lines) == 1 and "WARNING" in lines[0] and "whatever app" in lines[0]
    check_isolation(ClientOptions("127.0.0.1:9", tmp_path), lines.append)  # process: silent
    assert len(lines) == 1


# ----------------------------------------------------------------- 7. device-made key pairs


def test_keygen_writes_a_device_key_pair(tmp_path: Path, capsys) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    from fedpeft.cli import main
    from fedpeft.deploy.certs import check_private_key_file, check_public_key_file

    root = tmp_path / "node"
    assert main(["keygen", str(root)]) == 0
    key, pub = root / "device.key", root / "device.pub"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    private = load_ssh_private_key(key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert load_ssh_public_key(pub.read_bytes()) == private.public_key()
    check_private_key_file(key)  # what `fedpeft client --key` accepts
    check_public_key_file(pub)  # what `fedpeft server --node-keys` accepts
    assert "--node-keys device.pub" in capsys.readouterr().out
    before = key.read_bytes()
    assert main(["keygen", str(root)]) == 2
    assert "already exist" in capsys.readouterr().err and key.read_bytes() == before
    assert main(["keygen", str(root), "--force"]) == 0 and key.read_bytes() != before
    assert main(["keygen", str(root), "--name", "../x"]) == 2


def test_certs_warns_when_it_makes_device_private_keys(tmp_path: Path, capsys) -> None:
    from fedpeft.cli import main

    assert main(["certs", str(tmp_path / "a"), "--nodes", "1"]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert main(["certs", str(tmp_path / "b"), "--nodes", "0"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING" not in err and "fedpeft keygen" in out
    assert not list((tmp_path / "b").glob("node-*"))


def test_the_superlink_registers_a_device_made_public_key(tmp_path: Path) -> None:
    """A real SuperLink with SuperNode authentication (as `fedpeft server` starts it) admits
    the .pub that `fedpeft keygen` made on a device: the coordinator never saw its private key."""
    from fedpeft.deploy.certs import CertPaths, make_certs, make_device_key
    from fedpeft.deploy.coordinator import Coordinator, ServerOptions

    pki = make_certs(tmp_path / "pki", [], nodes=0)
    _, pub = make_device_key(tmp_path / "device")
    coord = Coordinator(ServerOptions(certs=pki.root), CertPaths(pki.root), lambda _: None)
    try:
        coord.start_superlink(tmp_path / "superlink.log")
        assert coord.register(pub).isdigit()
    finally:
        coord.close()
    assert not list(pki.root.glob("*.pub")) and not list(pki.root.glob("node-*"))
