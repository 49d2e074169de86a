"""Deployment on loopback: certificates, a coordinator (SuperLink with TLS and SuperNode
authentication behind the fleet gateway) and devices, each its own OS process as a user runs them.

One module-scoped deployment serves the end-to-end checks: a device with an unregistered key and a
device that trusts another CA must fail, while two registered devices train two rounds of FedIT on
tiny-bert, each on its own CSV. Every process is started in its own session and
tracked with its whole tree; all are stopped in ``finally`` even when something fails.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from fedpeft.server.reporting import MetricsLog

from fedpeft.deploy.certs import CertPaths, CertsError, certificate_sans, make_certs
from fedpeft.deploy.gateway import allowed
from fedpeft.deploy.processes import free_port, spawn, stop_all
from fedpeft.run.launcher import Tracker
from tests.helpers import (
    FEDPEFT,
    client_cmd,
    flower_env,
    review_csv,
    wait_exit,
    wait_listening,
)

ROUNDS = 2
DEVICE_EPSILON = 8.0  # device 1 asks for DP-SGD itself (the run does not)


# ------------------------------------------------------------------------------ certificates


def test_certs_files_permissions_and_formats(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "pki", ["10.1.2.3", "coordinator.lan"], nodes=2)
    assert stat.S_IMODE(paths.root.stat().st_mode) == 0o700
    for private in (paths.ca_key, paths.server_key, paths.node_key(1), paths.node_key(2)):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    for public in (paths.ca_cert, paths.server_cert, paths.node_pub(1)):
        assert stat.S_IMODE(public.stat().st_mode) == 0o644, public
    assert certificate_sans(paths.server_cert) == ["127.0.0.1", "localhost", "10.1.2.3",
                                                   "coordinator.lan"]
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    key = load_ssh_private_key(paths.node_key(1).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub = load_ssh_public_key(paths.node_pub(1).read_bytes())
    assert pub == key.public_key()
    assert paths.node_pub(1).read_text().startswith("ecdsa-sha2-nistp384 ")
    assert paths.node_pubs() == [paths.node_pub(1), paths.node_pub(2)]


def test_certs_never_overwrite_without_force(tmp_path: Path) -> None:
    paths = make_certs(tmp_path, [], nodes=1)
    before = paths.node_key(1).read_bytes()
    with pytest.raises(CertsError, match="already exist"):
        make_certs(tmp_path, [], nodes=1)
    assert paths.node_key(1).read_bytes() == before
    make_certs(tmp_path, [], nodes=1, force=True)
    assert paths.node_key(1).read_bytes() != before
    assert stat.S_IMODE(paths.node_key(1).stat().st_mode) == 0o600


@pytest.mark.parametrize("san", ["bad name", "http://x", "-x", "a/b"])
def test_certs_reject_bad_san(tmp_path: Path, san: str) -> None:
    with pytest.raises(CertsError, match="neither an IP address nor a DNS name"):
        make_certs(tmp_path, [san], nodes=0)
    assert not (tmp_path / "ca.key").exists()


def test_gateway_forwards_only_the_fleet_api() -> None:
    assert allowed("POST", "/v1/fleet/pull-messages")
    assert allowed("GET", "/health")
    assert not allowed("POST", "/v1/control/register-node")  # would defeat SuperNode auth
    assert not allowed("POST", "/v1/control/start-run")
    assert not allowed("POST", "/v1/runtime/acquire-task")
    assert not allowed("GET", "/v1/fleet/pull-messages")
    assert not allowed("POST", "/v1/fleet/../control/start-run")


# ------------------------------------------------------------------------- local processes


@dataclass
class Deployment:
    out: Path
    logs: Path
    server_rc: int = -999
    unregistered_rc: int = -999
    wrong_ca_rc: int = -999
    device_rcs: list[int] = field(default_factory=list)
    control_status: int = 0  # the Control API asked through the public port
    survivors: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    def log(self, name: str) -> str:
        return (self.logs / name).read_text(errors="replace")


def _post(url: str, ca: Path) -> int:
    import ssl
    import urllib.error
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"),
                                    context=ctx, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    pki, other = make_certs(root / "pki", [], nodes=3), make_certs(root / "other", [], nodes=1)
    result = Deployment(root / "out", root / "logs")
    result.logs.mkdir()
    env, port = flower_env(root / "flwr_home"), free_port()
    superlink = f"127.0.0.1:{port}"
    trackers: list[Tracker] = []
    try:
        server_cmd = [*FEDPEFT, "server", "--certs", str(pki.root), "--host", "127.0.0.1",
                      "--port", str(port), "--out", str(result.out), "--node-keys",
                      str(pki.node_pub(1)), str(pki.node_pub(2)), "--timeout", "150"]
        for item in ('model.name="tiny-bert"', f"federation.rounds={ROUNDS}",
                     "train.local_steps=2", "train.batch_size=8", "eval.subset=100",
                     "data.test_size=200", 'data.partitioner="iid"'):
            server_cmd += ["--set", item]
        trackers.append(spawn(server_cmd, env, result.logs / "server.log"))
        server = trackers[0].proc
        wait_listening(port, server, 90)
        result.control_status = _post(f"https://{superlink}/v1/control/list-runs", pki.ca_cert)
        # node-3 is not registered; node-1's key with a CA that did not sign the server cert
        stray = review_csv(root / "x.csv", 0)
        bad = [spawn(client_cmd(superlink, pki.ca_cert, pki.node_key(3), stray,
                                ["--max-wait", "10"]), env, result.logs / "unregistered.log"),
               spawn(client_cmd(superlink, other.ca_cert, pki.node_key(1), stray,
                                ["--max-wait", "10"]), env, result.logs / "wrong_ca.log")]
        trackers += bad
        for i in (1, 2):  # the refused ones do not get in the way of the registered ones
            own_dp = ["--epsilon", str(DEVICE_EPSILON)] if i == 1 else []  # device 1 only
            trackers.append(spawn(
                client_cmd(superlink, pki.ca_cert, pki.node_key(i),
                           review_csv(root / f"d{i}.csv", i), ["--max-wait", "5", *own_dp]),
                env, result.logs / f"device{i}.log"))
        result.unregistered_rc = wait_exit(bad[0].proc, 60)
        result.wrong_ca_rc = wait_exit(bad[1].proc, 60)
        result.server_rc = wait_exit(server, 150)
        result.device_rcs = [wait_exit(t.proc, 40) for t in trackers[3:]]
    finally:
        stop_all(trackers, print)
        result.pids = sorted({pid for t in trackers for pid in t.known})
        result.survivors = sorted({pid for t in trackers for pid in t.scan()})
    yield result


@pytest.mark.slow
def test_two_devices_train_two_rounds_over_tls(deployment: Deployment) -> None:
    assert deployment.server_rc == 0, deployment.log("server.log")[-3000:]
    rows = MetricsLog.read(deployment.out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows[1:]:
        assert row["clients_sampled"] == 2 and row["clients_ok"] == 2, row
        assert row["clients_failed"] == 0 and row["clients_rejected"] == 0
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0 and row["train_s"] > 0
    summary = json.loads((deployment.out / "summary.json").read_text())
    assert summary["clients"] == 2 and summary["rounds"] == ROUNDS
    assert summary["fleet_http_bytes_up"] >= sum(r["bytes_up"] for r in rows)
    assert summary["fleet_http_refused"] == 1  # the fixture's Control API probe
    for row in rows[1:]:  # only device 1 trained under DP-SGD, with its own budget
        assert len(row["epsilon_clients"]) == 1, row
        assert 0 < row["epsilon_per_client"][0] == row["epsilon"] <= DEVICE_EPSILON
    assert rows[1]["epsilon"] == DEVICE_EPSILON  # its budget: the spent epsilon reveals its n
    ledger = json.loads((deployment.out.parent / "flwr_home" / "fedpeft" /
                         "privacy-ledger.json").read_text())  # the device's own account
    assert [r["history"][0][2] for r in ledger["runs"]] == [ROUNDS * 2]  # x train.local_steps
    assert 0 < ledger["spent"] <= DEVICE_EPSILON
    assert deployment.control_status == 404
    assert (deployment.out / "adapter" / "adapter_model.safetensors").exists()
    config = (deployment.out / "config.toml").read_text()
    assert 'labels = [ "rotten", "fresh",]' in config or 'labels = ["rotten", "fresh"]' in config
    server_log = deployment.log("server.log")
    assert "TLS, SuperNode authentication on" in server_log
    for i in (1, 2):  # each device trained on its own file, in one long-running process
        log = deployment.log(f"device{i}.log")
        assert log.count("round task done") == ROUNDS, log[-2000:]
        assert "FAILED" not in log


@pytest.mark.slow
def test_devices_exit_cleanly_when_the_coordinator_is_gone(deployment: Deployment) -> None:
    assert deployment.device_rcs == [0, 0], deployment.log("device1.log")[-1500:]
    assert "the coordinator is gone" in deployment.log("device1.log")


@pytest.mark.slow
def test_unregistered_key_is_refused(deployment: Deployment) -> None:
    log = deployment.log("unregistered.log")
    assert deployment.unregistered_rc not in (0, -999), log[-1500:]
    assert "refused this device's key" in log
    assert "round task done" not in log


@pytest.mark.slow
def test_certificate_from_another_ca_cannot_connect(deployment: Deployment) -> None:
    log = deployment.log("wrong_ca.log")
    assert deployment.wrong_ca_rc not in (0, -999), log[-1500:]
    assert "not signed by --ca" in log
    assert "round task done" not in log


@pytest.mark.slow
def test_every_started_process_is_stopped(deployment: Deployment) -> None:
    assert len(deployment.pids) >= 8  # coordinator, SuperLink, SuperExec, ServerApp, 4 devices..
    assert deployment.survivors == []
    alive = [p for p in deployment.pids if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]
    assert alive == []



def _tiny_run_settings(rounds: int) -> list[str]:
    out: list[str] = []
    for item in ('model.name="tiny-bert"', f"federation.rounds={rounds}", "train.local_steps=2",
                 "train.batch_size=8", "eval.subset=100", "data.test_size=200",
                 'data.partitioner="iid"'):
        out += ["--set", item]
    return out


@pytest.mark.slow
def test_a_stopped_coordinator_resumes_after_its_last_finished_round(tmp_path: Path) -> None:
    """SIGTERM the coordinator mid-run, then `fedpeft server --resume OUT` with the same
    devices: the run continues after the last checkpointed round and ends with every round."""
    pki = make_certs(tmp_path / "pki", [], nodes=2)
    out, logs, env, rounds = tmp_path / "out", tmp_path / "logs", flower_env(tmp_path / "home"), 3
    logs.mkdir()
    data = {i: review_csv(tmp_path / f"d{i}.csv", i) for i in (1, 2)}
    trackers: list[Tracker] = []

    def start(args: list[str], tag: str) -> Tracker:
        port = free_port()
        server = spawn([*FEDPEFT, "server", "--certs", str(pki.root), "--host", "127.0.0.1",
                        "--port", str(port), "--timeout", "150", *args], env,
                       logs / f"server-{tag}.log")
        trackers.append(server)
        wait_listening(port, server.proc, 90)
        for i in (1, 2):
            trackers.append(spawn(client_cmd(f"127.0.0.1:{port}", pki.ca_cert, pki.node_key(i),
                                             data[i], ["--max-wait", "5"]), env,
                                  logs / f"device{i}-{tag}.log"))
        return server

    try:
        first = start(["--out", str(out), *_tiny_run_settings(rounds)], "first")
        deadline = time.monotonic() + 120
        while len(MetricsLog.read(out / "metrics.jsonl")) < 2:  # round 0 and round 1 done
            assert first.proc.poll() is None, (logs / "server-first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (logs / "server-first.log").read_text()[-3000:]
            time.sleep(0.2)
        os.kill(first.proc.pid, signal.SIGTERM)
        first_rc = wait_exit(first.proc, 60)
        for device in trackers[1:3]:
            wait_exit(device.proc, 40)
        second = start(["--resume", str(out)], "second")
        second_rc = wait_exit(second.proc, 150)
    finally:
        stop_all(trackers, print)
    log = (logs / "server-second.log").read_text()
    assert first_rc not in (0, -999), (logs / "server-first.log").read_text()[-3000:]
    assert second_rc == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 1 <= summary["resumed_after"] < rounds
    assert f"resuming after round {summary['resumed_after']}" in log
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert all(r["clients_ok"] == 2 for r in rows[1:]), rows
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def _chats(path: Path, topic: str, rows: int) -> Path:
    """A chat JSONL file (the ``messages`` schema) on ``topic``: each file its own content."""
    lines = []
    for i in range(rows):
        messages = [{"role": "user", "content": f"What is {topic} number {i}?"},
                    {"role": "assistant", "content": f"It is {topic} {i + 1}."}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_two_devices_fine_tune_a_causal_lm_on_their_own_chats(tmp_path: Path) -> None:
    """A tiny Llama folder, the coordinator's chats its held-out set, and two devices that each
    run `fedpeft client --data chats.jsonl` on their own chats: every round takes both replies
    (their base fingerprints match the coordinator's), and the run reports loss, perplexity and
    samples.md and exports a causal-LM adapter."""
    from tests.tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "llama")
    pki = make_certs(tmp_path / "pki", [], nodes=2)
    out, logs, env = tmp_path / "out", tmp_path / "logs", flower_env(tmp_path / "home")
    port = free_port()
    logs.mkdir()
    held_out = _chats(tmp_path / "server.jsonl", "the time", 16)
    devices = {1: _chats(tmp_path / "d1.jsonl", "a colour", 10),
               2: _chats(tmp_path / "d2.jsonl", "a fruit", 10)}
    server_cmd = [*FEDPEFT, "server", "--certs", str(pki.root), "--host", "127.0.0.1", "--port",
                  str(port), "--out", str(out), "--timeout", "150"]
    for item in (f'model.name="{model}"', 'data.dataset="file"', f'data.path="{held_out}"',
                 "data.test_size=10", 'data.partitioner="iid"', f"federation.rounds={ROUNDS}",
                 "train.local_steps=2", "train.batch_size=4", "model.max_length=48",
                 "eval.subset=10"):
        server_cmd += ["--set", item]
    trackers: list[Tracker] = []
    try:
        trackers.append(spawn(server_cmd, env, logs / "server.log"))
        wait_listening(port, trackers[0].proc, 90)
        for i, data in devices.items():
            trackers.append(spawn(client_cmd(f"127.0.0.1:{port}", pki.ca_cert, pki.node_key(i),
                                             data, ["--max-wait", "5"]), env,
                                  logs / f"device{i}.log"))
        server_rc = wait_exit(trackers[0].proc, 150)
        device_rcs = [wait_exit(t.proc, 40) for t in trackers[1:]]
    finally:
        stop_all(trackers, print)
    assert server_rc == 0, (logs / "server.log").read_text(errors="replace")[-3000:]
    assert device_rcs == [0, 0], (logs / "device1.log").read_text(errors="replace")[-2000:]
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows:
        assert row["loss"] > 0 and row["perplexity"] > 1 and row["accuracy"] is None, row
    for row in rows[1:]:
        assert row["clients_ok"] == 2 and row["clients_rejected"] == 0, row
    assert (out / "samples.md").read_text().count("## Round") == ROUNDS + 1
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM"
    assert "final loss" in (logs / "server.log").read_text(errors="replace")  # no accuracy
    for i in devices:
        log = (logs / f"device{i}.log").read_text(errors="replace")
        assert log.count("round task done") == ROUNDS and "FAILED" not in log, log[-2000:]


def _start_and_signal(cmd: list[str], env: dict[str, str], log: Path, ready: str,
                      sig: int, sigint_ignored: bool = False) -> tuple[int, list[int], list[int]]:
    """Start ``cmd``, wait for ``ready`` in its log, send ``sig``: (exit code, the children it
    had started, survivors). ``sigint_ignored``: start it with SIGINT ignored, as a background
    job of a non-interactive shell is."""
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None
    try:
        tracker = spawn(cmd, env, log)  # a child inherits an ignored SIGINT
    finally:
        if saved is not None:
            signal.signal(signal.SIGINT, saved)
    try:
        deadline = time.monotonic() + 90
        while ready not in log.read_text(errors="replace"):
            assert tracker.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(1.0)  # let it start its children
        tracker.scan()
        children = sorted(set(tracker.known) - {tracker.proc.pid})
        os.kill(tracker.proc.pid, sig)
        # the design's bound: 10 s SIGTERM grace + 5 s after SIGKILL + the gateway's 10-s join
        rc = wait_exit(tracker.proc, 45)
        time.sleep(0.5)
        return rc, children, sorted(tracker.scan())
    finally:
        tracker.stop_all(grace_s=3)


@pytest.mark.slow
def test_client_stops_its_supernode_on_sigterm(tmp_path: Path) -> None:
    pki = make_certs(tmp_path / "pki", [], nodes=1)
    cmd = client_cmd(f"127.0.0.1:{free_port()}", pki.ca_cert, pki.node_key(1),
                     review_csv(tmp_path / "d.csv", 1), [])  # nobody listens: retries forever
    rc, children, alive = _start_and_signal(cmd, flower_env(tmp_path / "home"), tmp_path / "c.log",
                                            "Ctrl-C stops it", signal.SIGTERM)
    assert rc == 130, (tmp_path / "c.log").read_text()
    assert children, "flower-supernode was not started"
    assert alive == []


@pytest.mark.slow
def test_server_stops_superlink_on_sigint(tmp_path: Path) -> None:
    pki = make_certs(tmp_path / "pki", [], nodes=1)
    cmd = [*FEDPEFT, "server", "--certs", str(pki.root), "--host", "127.0.0.1", "--port",
           str(free_port()), "--out", str(tmp_path / "out"), "--set", 'model.name="tiny-bert"',
           "--set", "data.test_size=200"]
    rc, children, alive = _start_and_signal(cmd, flower_env(tmp_path / "home"), tmp_path / "s.log",
                                            "waiting for 1 devices", signal.SIGINT,
                                            sigint_ignored=True)
    assert rc == 130, (tmp_path / "s.log").read_text()
    assert len(children) >= 2  # flower-superlink, its SuperExec, flwr run, ServerApp
    assert alive == []


def test_client_refuses_missing_files_and_absent_cuda(tmp_path: Path) -> None:
    from fedpeft.cli import main

    pki = make_certs(tmp_path / "pki", [], nodes=1)
    data = review_csv(tmp_path / "d.csv", 1)
    base = ["client", "--superlink", "127.0.0.1:1", "--ca", str(pki.ca_cert)]
    assert main([*base, "--key", str(pki.node_key(1)), "--data", str(tmp_path / "no.csv")]) == 2
    os.chmod(pki.node_key(1), 0o644)
    assert main([*base, "--key", str(pki.node_key(1)), "--data", str(data)]) == 2
    os.chmod(pki.node_key(1), 0o600)
    import torch

    if not torch.cuda.is_available():
        assert main([*base, "--key", str(pki.node_key(1)), "--data", str(data),
                     "--device", "cuda"]) == 2


def test_server_requires_certs_unless_insecure(tmp_path: Path, capsys) -> None:
    from fedpeft.cli import main

    assert main(["server", "--out", str(tmp_path)]) == 2
    assert "--certs DIR is required" in capsys.readouterr().err
    assert main(["server", "--certs", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert isinstance(CertPaths(tmp_path).node_pubs(), list)


def test_server_resume_refusals_name_the_problem(tmp_path: Path, capsys) -> None:
    """Before anything starts: --resume of a folder that is no run, with another --out, or with
    another device count than the run was started with."""
    from fedpeft.cli import main
    from fedpeft.core.config import load_config, to_toml

    base = ["server", "--insecure", "--clients", "2", "--resume", str(tmp_path)]
    assert main([*base, "--out", str(tmp_path / "other")]) == 2
    assert "continues in that folder; drop --out" in capsys.readouterr().err
    assert main(base) == 2
    assert "no config.toml there" in capsys.readouterr().err
    three = load_config(None, ["federation.clients=3", "federation.clients_per_round=3"])
    (tmp_path / "config.toml").write_text(to_toml(three))
    assert main(base) == 2
    assert "started with 3 devices, this coordinator would wait for 2" in capsys.readouterr().err


# ------------------------------------------------------------------------ device internals


def _fab(tmp_path: Path, clientapp: str) -> bytes:
    import io
    import zipfile

    from fedpeft.run.launcher import write_app_dir

    app = write_app_dir(tmp_path / clientapp.replace(":", "_"), "fedpeft.server.app:app",
                        clientapp, {"config-file": "", "out-dir": ""})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(app / "pyproject.toml", "pyproject.toml")
    return buf.getvalue()


def test_device_runs_only_the_fedpeft_clientapp(tmp_path: Path) -> None:
    from flwr.supercore.fab import Fab

    from fedpeft.deploy.clientexec import WrongAppError, check_fab

    ours = "fedpeft.client.app:app"
    check_fab(Fab("h", _fab(tmp_path, ours), {}), ours)
    with pytest.raises(WrongAppError, match="only runs"):
        check_fab(Fab("h", _fab(tmp_path, "evil.module:app"), {}), ours)
    with pytest.raises(WrongAppError, match="no readable clientapp"):
        check_fab(Fab("h", b"not a zip", {}), ours)


def test_node_data_wins_over_the_server_partition(tmp_path: Path) -> None:
    from fedpeft.client.app import node_workspace

    from fedpeft.core.config import load_config

    cfg = load_config(None, ['model.name="tiny-bert"', 'data.labels=["rotten", "fresh"]'])
    path = tmp_path / "only_fresh.csv"
    path.write_text('text,label\n"nice",fresh\n"lovely",fresh\n"good",fresh\n')
    node_cfg, workspace = node_workspace(cfg, {"data-path": str(path), "device": "cpu",
                                               "threads": 1})
    assert node_cfg.train.device == "cpu"
    assert workspace.num_labels == 2  # the run's classes, though this file has one
    for partition_id in (0, 7):
        data = workspace.partition(partition_id, 100)
        assert len(data) == 3 and data.labels.tolist() == [1, 1, 1]
    sim_cfg, _ = node_workspace(cfg, {"partition-id": 0})  # simulation: unchanged
    assert sim_cfg is cfg


def test_a_bad_node_override_is_one_config_error(tmp_path: Path) -> None:
    """A node's own settings pass the checks of ``--set``: a bad one is a ConfigError naming the
    node's config and the key, not a crash or an unchecked config."""
    from fedpeft.client.step import node_overrides

    from fedpeft.core.config import ConfigError, load_config

    cfg = load_config(None, ['model.name="tiny-bert"'])
    assert node_overrides(cfg, {"batch-size": "4", "epsilon": "3"}).train.batch_size == 4
    for node, match in (({"batch-size": "0"}, r"train\.batch_size = 0 is out of range"),
                        ({"local-steps": "many"}, r"train\.local_steps = 'many': expected an int"),
                        ({"device": "gpu"}, r"train\.device = 'gpu'"),
                        ({"epsilon": "nan"}, r"privacy\.epsilon = nan is not a finite"),
                        ({"epsilon": "lots"}, r"epsilon = 'lots': expected a number")):
        with pytest.raises(ConfigError, match=match) as err:
            node_overrides(cfg, node)
        assert "this node's config" in str(err.value)


def test_device_data_is_checked_before_connecting_and_own_columns_win(
        tmp_path: Path, capsys) -> None:
    """A file without its columns stops `fedpeft client` with one line before it connects; the
    device's own column names reach its workspace; labels outside the run's classes are one
    clear ConfigError (which the device executor reports without a traceback)."""
    from fedpeft.client.app import node_workspace

    from fedpeft.cli import main
    from fedpeft.core.config import ConfigError, load_config

    pki = make_certs(tmp_path / "pki", [], nodes=1)
    base = ["client", "--superlink", "127.0.0.1:1", "--ca", str(pki.ca_cert), "--key",
            str(pki.node_key(1))]
    renamed = tmp_path / "renamed.csv"
    renamed.write_text('review,verdict\n"nice",fresh\n"dull",rotten\n')
    assert main([*base, "--data", str(renamed)]) == 2
    err = capsys.readouterr().err
    assert "no 'text' or 'label' column (columns found: review, verdict)" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert main([*base, "--data", str(empty)]) == 2
    assert "no rows" in capsys.readouterr().err

    cfg = load_config(None, ['model.name="tiny-bert"', 'data.labels=["rotten", "fresh"]'])
    own = {"data-path": str(renamed), "text-column": "review", "label-column": "verdict"}
    node_cfg, workspace = node_workspace(cfg, own)
    assert (node_cfg.data.text_column, node_cfg.data.label_column) == ("review", "verdict")
    assert (node_cfg.train.batch_size, node_cfg.train.local_steps) == (16, 5)  # the run's
    weak, _ = node_workspace(cfg, {**own, "batch-size": 4, "local-steps": 2})  # its own profile
    assert (weak.train.batch_size, weak.train.local_steps) == (4, 2)
    assert main([*base, "--data", str(renamed), "--local-steps", "0"]) == 2
    assert "--local-steps 0: expected a positive integer" in capsys.readouterr().err
    assert workspace.partition(0, 100).labels.tolist() == [1, 0]
    odd = tmp_path / "odd.csv"
    odd.write_text('text,label\n"nice",great\n"dull",rotten\n')
    with pytest.raises(ConfigError, match=r"labels \['great'\] are outside the task's classes"):
        node_workspace(cfg, {"data-path": str(odd)})[1].partition(0, 100)


def test_device_chat_file_passes_the_checks_before_connecting(tmp_path: Path, capsys) -> None:
    """A chat JSONL (no text/label columns) is a device's file for a causal-LM run: the check
    before connecting moves on to the next file (here a missing --ca); a malformed chat row
    stops it with the row's problem."""
    from fedpeft.cli import main

    pki = make_certs(tmp_path / "pki", [], nodes=1)
    base = ["client", "--superlink", "127.0.0.1:1", "--key", str(pki.node_key(1))]
    chats = _chats(tmp_path / "chats.jsonl", "a colour", 3)
    assert main([*base, "--ca", str(tmp_path / "no.crt"), "--data", str(chats)]) == 2
    err = capsys.readouterr().err
    assert "no.crt: no such file" in err and "--data" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main([*base, "--ca", str(pki.ca_cert), "--data", str(bad)]) == 2
    assert "bad.jsonl row 0: roles must be system, user or assistant, with at least one " \
           "assistant turn" in capsys.readouterr().err
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "hi", "answer": "yo"}) + "\n")
    assert main([*base, "--ca", str(pki.ca_cert), "--data", str(odd)]) == 2
    assert "or use a chat/instruction schema (messages" in capsys.readouterr().err


def test_device_chat_file_is_its_whole_partition(tmp_path: Path) -> None:
    """A causal-LM run split by a column in simulation (data.partition_by) still takes a
    device's chats without that column; a file of the other kind (labelled texts for a chat
    run, chats for a label run) is one clear ConfigError."""
    from fedpeft.client.app import node_workspace

    from fedpeft.core.config import ConfigError, load_config
    from tests.tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "llama")
    run = [f'model.name="{model}"', 'data.dataset="file"', 'data.path="server.jsonl"',
           'data.partitioner="natural"', 'data.partition_by="user"', "model.max_length=48"]
    chats = _chats(tmp_path / "chats.jsonl", "a fruit", 5)
    cfg = load_config(None, [*run, "data.labels=[]"])
    _, workspace = node_workspace(cfg, {"data-path": str(chats), "threads": 1})
    assert workspace.train.chats is not None and len(workspace.train) == 5
    assert len(workspace.partition(3, 7).ids) == 5  # every row, whatever partition id
    with pytest.raises(ConfigError, match="holds labelled texts, but this run trains a causal"):
        node_workspace(cfg, {"data-path": str(review_csv(tmp_path / "d.csv", 1)), "threads": 1})
    label_run = load_config(None, [*run, 'data.labels=["rotten", "fresh"]'])
    with pytest.raises(ConfigError, match=r"holds chat/instruction examples, but this run is a "
                                          r"label task \(classes \['rotten', 'fresh'\]\)"):
        node_workspace(label_run, {"data-path": str(chats), "threads": 1})
