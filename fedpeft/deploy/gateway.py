"""The coordinator's public endpoint: a TLS reverse proxy that lets devices reach the SuperLink's
Fleet API and nothing else.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register``) and the Runtime API (ServerApp, SuperExec) on one port, and the open-source build does
not authenticate the Control API: whoever reaches that port can submit runs or register their own
SuperNode key, which would defeat SuperNode authentication. So ``fedpeft server`` keeps the
SuperLink on 127.0.0.1 and publishes only this gateway, which forwards ``POST /v1/fleet/*`` (and
``GET /health``) and answers 404 to everything else. SuperNode authentication still happens in the
SuperLink: the signed headers pass through unchanged.

Request bodies are streamed to the SuperLink, never read whole, and capped at ``max_body_bytes``
(default ``MAX_BODY_BYTES``, 64 MiB): the gateway runs before SuperNode authentication (that is the
SuperLink's), so an unauthenticated sender must not be able to make it hold a large body. A declared
``Content-Length`` over the cap gets 413 before any of the body is read; a chunked body is cut off
with 413 as soon as it passes the cap. 64 MiB is about 30 times the largest fedpeft message
measured (a SmolLM2 LoRA upload, about 2 MB) and leaves room for bigger models and ranks; raise it
with ``fedpeft server --max-body-mb``.

The gateway also counts the HTTP bodies it forwards, per direction (``stats``).
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
MAX_BODY_BYTES = 64 * 2**20
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "host", "content-length",
               "content-encoding", "accept-encoding"}


@dataclass
class TrafficStats:
    """HTTP body bytes through the gateway: ``up`` = device to coordinator."""

    requests: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def snapshot(self) -> dict[str, int]:
        return {"requests": self.requests, "refused": self.refused, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down}


def allowed(method: str, path: str) -> bool:
    """Only what a SuperNode needs: the Fleet API and the health probe."""
    return (method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path) or (
        method == "GET" and path == "/health")


class BodyTooLarge(Exception):
    """A request body passed the gateway's cap while it was being streamed."""


async def capped(chunks: AsyncIterator[bytes], limit: int,
                 count: Callable[[int], None]) -> AsyncIterator[bytes]:
    """Pass ``chunks`` through, reporting each one's size to ``count``; raise BodyTooLarge once
    more than ``limit`` bytes went by (before passing on the chunk that crossed it)."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge
        count(len(chunk))
        yield chunk


def _too_large(limit: int) -> Response:
    return PlainTextResponse(f"request body over the gateway's limit of {limit} bytes",
                             status_code=413, headers={"connection": "close"})


class FleetGateway:
    """Forward the Fleet API from ``host:port`` (TLS with ``certfile``/``keyfile``, or plain HTTP
    when both are None) to ``upstream`` (e.g. ``https://127.0.0.1:PORT``), verified with
    ``upstream_verify`` (an SSL context, or False for a plain-HTTP upstream); request bodies over
    ``max_body_bytes`` get 413."""

    def __init__(self, upstream: str, upstream_verify: ssl.SSLContext | bool, host: str,
                 port: int, certfile: str | None = None, keyfile: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes = {max_body_bytes}: expected 1 or more")
        self.upstream, self.verify = upstream.rstrip("/"), upstream_verify
        self.max_body = max_body_bytes
        self.stats = TrafficStats()
        self._client: httpx.AsyncClient | None = None
        app = Starlette(routes=[Route("/{path:path}", self._handle,
                                      methods=["GET", "POST", "PUT", "DELETE", "PATCH"])],
                        lifespan=self._lifespan)
        self.server = uvicorn.Server(uvicorn.Config(
            app, host=host, port=port, ssl_certfile=certfile, ssl_keyfile=keyfile,
            log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30))
        self._thread: threading.Thread | None = None

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=self.upstream, verify=self.verify,
                                     timeout=httpx.Timeout(300.0, connect=10.0)) as client:
            self._client = client
            yield
        self._client = None

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        if not allowed(request.method, path):
            self.stats.refused += 1
            return PlainTextResponse("not found", status_code=404)
        assert self._client is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        declared = request.headers.get("content-length")
        if declared is not None:  # forwarded as is: the SuperLink sees an ordinary request
            if not declared.isdigit():
                self.stats.refused += 1
                return PlainTextResponse("bad Content-Length", status_code=400)
            if int(declared) > self.max_body:
                self.stats.refused += 1
                return _too_large(self.max_body)
            headers.append(("content-length", declared))
        body = capped(request.stream(), self.max_body, self._count_up)
        try:
            upstream = await self._client.request(request.method, path, content=body,
                                                  headers=headers,
                                                  params=request.query_params.multi_items())
        except BodyTooLarge:
            self.stats.refused += 1
            return _too_large(self.max_body)
        except ClientDisconnect:
            self.stats.refused += 1
            return PlainTextResponse("client went away", status_code=400)
        except httpx.TransportError as exc:
            return PlainTextResponse(f"SuperLink unreachable: {type(exc).__name__}",
                                     status_code=503)
        self.stats.requests += 1
        self.stats.bytes_down += len(upstream.content)
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        return Response(upstream.content, status_code=upstream.status_code, headers=out_headers)

    def _count_up(self, size: int) -> None:
        self.stats.bytes_up += size

    def start(self, timeout_s: float = 30.0) -> None:
        """Serve in a background thread; return once it listens (raise if it cannot)."""
        self._thread = threading.Thread(target=self.server.run, name="fleet-gateway",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fleet gateway could not start (port in use?)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
