"""A long-running ClientApp executor for a SuperNode started with ``--isolation process``.

With Flower's default ``--isolation subprocess`` the SuperNode's SuperExec starts a fresh
``flwr-clientapp`` process for every message, so Python, torch, transformers and the model are
loaded again every round (about 20 s per round on 2 cores). This loop takes the SuperExec's place:
it asks the SuperNode's Runtime API for ClientApp tasks (``AcquireTask``, signed with the shared
SuperExec secret) and runs each task in this process with the same steps as ``flwr-clientapp``:
pull the message, context, run and FAB; call the ClientApp; push the reply and the updated
context. Imports and ``fedpeft.core.workspace``'s per-process caches (tokenizer, encoded data,
model) survive from round to round.

Only the expected ClientApp runs: a FAB whose ``clientapp`` component is another one gets an
error reply; nothing from the FAB is installed or imported.
"""

from __future__ import annotations

import threading
import time
import zipfile
from collections.abc import Callable
from logging import DEBUG, ERROR, WARNING

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.object_ref import load_app
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedpeft.core.config import ConfigError

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
# The SuperNode hands out a task before it has all of the message's objects from the SuperLink;
# flwr-clientapp then retries an object after 1 s, 2 s, ... Polling the local store every 50 ms
# instead saves about a second per round.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 0.5


class WrongAppError(Exception):
    """The run's FAB names another ClientApp than the one this device agreed to run."""


def _acquire_client(address: str, secret: bytes | None) -> RuntimeHttpClient:
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods={ACQUIRE_METHOD}))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=None)


def _task_client(address: str, token: str) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())


# What a coordinator learns when a task fails on this device: one of these codes, never the
# exception's text (it can hold label values, file names, paths); the full text stays in the
# device's own log. The innermost fedpeft module of the traceback picks the code.
REASONS = (("fedpeft.core.packing", "downlink rejected"),
           ("fedpeft.core.wire", "downlink rejected"),
           ("fedpeft.client.downlink", "downlink rejected"),
           ("fedpeft.core.data", "data error"), ("fedpeft.core.tasks", "data error"),
           ("fedpeft.core.models", "model error"), ("fedpeft.core.adapters", "model error"),
           ("fedpeft.core.fingerprint", "model error"), ("fedpeft.core.ledger", "privacy error"),
           ("fedpeft.core.privacy", "privacy error"), ("fedpeft.core.training", "training error"))


def reason_code(exc: BaseException) -> str:
    """The fixed reason a coordinator is told for ``exc`` (see ``REASONS``)."""
    if isinstance(exc, WrongAppError):
        return "wrong app"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out of memory"
    modules = []
    tb = exc.__traceback__
    while tb is not None:
        modules.append(str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    for module in reversed(modules):
        for prefix, code in REASONS:
            if module.startswith(prefix):
                return code
    return "config error" if isinstance(exc, ConfigError) else "client error"


def check_fab(fab: Fab, expected_ref: str) -> None:
    """Refuse a run whose app declares another ClientApp than ``expected_ref``."""
    try:
        ref = get_fab_config(fab.content)["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise WrongAppError(f"the run's app bundle has no readable clientapp: {exc}") from exc
    if ref != expected_ref:
        raise WrongAppError(f"the run asks for ClientApp {ref!r}; this device only runs "
                            f"{expected_ref!r}")


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """``flwr.supernode.runtime.run_clientapp.pull_task_input`` (Flower 1.41) with a short
    backoff for objects that have not reached the SuperNode yet."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run, fab = run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp does
    return message, context, run, fab


class AppLoader:
    """Imports the ClientApp in a background thread as soon as the device starts (torch,
    transformers: seconds), so neither the first round nor an early exit waits for it."""

    def __init__(self, ref: str) -> None:
        self.ref, self._app, self._error = ref, None, None
        self._done = threading.Event()
        threading.Thread(target=self._load, name="clientapp-import", daemon=True).start()

    def _load(self) -> None:
        try:
            app = load_app(self.ref, WrongAppError)
            if not isinstance(app, ClientApp):
                raise WrongAppError(f"{self.ref} is not a flwr ClientApp")
            self._app = app
        except Exception as exc:  # reported with the first task
            self._error = exc
        finally:
            self._done.set()

    def get(self) -> ClientApp:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._app is not None
        return self._app


def run_task(address: str, token: str, get_app: Callable[[], ClientApp],
             expected_ref: str) -> bool:
    """One ClientApp task, in this process; True when the ClientApp replied without error."""
    client = _task_client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        heartbeat.start()
        message, context, _run, fab = pull_task_input(client)
        check_fab(fab, expected_ref)
        reply = get_app()(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # reply with an error, as flwr-clientapp does, and keep serving
        code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(exc, WrongAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        details = f"fedpeft device: {reason_code(exc)}"  # the coordinator learns this only
        if isinstance(exc, ConfigError):  # a user error (e.g. this device's data file): one line
            log(ERROR, "fedpeft: error on this device (the coordinator is told %r): %s",
                details, exc)
        else:
            log(ERROR, "ClientApp raised an exception (the coordinator is told %r)", details,
                exc_info=exc)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return status == SubStatus.COMPLETED


def serve(address: str, secret: bytes | None, app_ref: str, *, keep_going: Callable[[], bool],
          poll_s: float = 0.2, on_task: Callable[[bool, float], None] | None = None,
          run_ref: str | None = None) -> None:
    """Run ClientApp tasks from the SuperNode at ``address`` until ``keep_going()`` is False.

    ``app_ref`` (``module:attr``) is the ClientApp a run must name; ``run_ref`` the one this
    device runs for it (default the same; a device: the same functions without simulation-only
    mods). It is imported once, right away in the background, so the first round does not pay
    for the imports either. ``on_task(ok, seconds)`` runs after each task.
    """
    loader = AppLoader(run_ref or app_ref)
    client = _acquire_client(address, secret)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    unreachable_since: float | None = None
    try:
        while keep_going():
            try:
                res = client.AcquireTask(request)
                unreachable_since = None
            except httpx.TransportError:  # SuperNode not up yet (or going down)
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > 60:
                    log(WARNING, "SuperNode Runtime API at %s unreachable for 60 s", address)
                    unreachable_since = time.monotonic()
                time.sleep(poll_s)
                continue
            if res.HasField("task") and res.token:
                start = time.perf_counter()
                ok = run_task(address, res.token, loader.get, app_ref)
                seconds = time.perf_counter() - start
                log(DEBUG, "ClientApp task %d %s in %.2f s", res.task.task_id,
                    "done" if ok else "FAILED", seconds)
                if on_task is not None:
                    on_task(ok, seconds)
            else:
                time.sleep(poll_s)
    finally:
        client.close()
