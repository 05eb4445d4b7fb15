"""The ``serve`` command: a FastAPI app with micro-batching, limits and a web page.

Endpoints: ``POST /predict`` (multipart files or a raw image body), ``GET /healthz``,
``GET /readyz``, ``GET /metrics`` (Prometheus), ``GET /labels``, ``GET /`` (the web page),
``GET /docs`` (OpenAPI). Bad input always gets a 4xx with a JSON body
``{"error": {"status", "code", "message"}}``, never a 500, and never stops the server.

Concurrency (``batching.py``): requests decode their images on a bounded, fair thread pool and
put them on a bounded queue; one worker takes what is queued, up to ``max_batch`` images
(optionally waiting ``max_wait_ms`` for more), and runs them through the Predictor in one call,
on one inference thread. This module imports no training code.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import images as images_lib
from ..errors import UserError, first_line
from .batching import ApiError, Deadline, Decoder, MicroBatcher, timeout_error
from .inference import Predictor, top_json
from .settings import ModelOptions, ServeConfig

log = logging.getLogger(__name__)


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()  # per app: tests and embedders can run several
    return registry, {
        "requests": Counter(
            "cifar10_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry
        ),
        "latency": Histogram(
            "cifar10_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        ),
        "batch": Histogram(
            "cifar10_batch_size_images",
            "Images per model call",
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        ),
        "images": Counter("cifar10_images_total", "Images predicted", registry=registry),
        "queue": Gauge("cifar10_queue_images", "Images waiting or running", registry=registry),
    }


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message}},
        status_code=status,
        headers=headers,
    )


def _install_error_handlers(app: FastAPI) -> None:
    """Our ApiError, and FastAPI's own errors (bad query values, unknown paths, wrong
    methods), all answer ``{"error": {"status", "code", "message"}}``: one format to parse."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return _error(422, "invalid_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def _read_body(request: Request, settings: ServeConfig) -> bytes:
    """The body, refused (413) as soon as it passes the limit, before it is all in memory."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise ApiError(
            413, "too_large", f"body of {int(declared):,} bytes exceeds {settings.max_body_bytes:,}"
        )
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise ApiError(413, "too_large", f"body exceeds {settings.max_body_bytes:,} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        client = request.client.host if request.client else "?"
        log.info("client %s disconnected during the upload (%d bytes received)", client, size)
        raise ApiError(400, "client_disconnected", "the client went away") from None
    return b"".join(chunks)


async def _uploads(request: Request, settings: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded image: multipart files, or one raw image body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_body(request, settings)
    if ctype == "multipart/form-data":
        request._body = body  # let Starlette parse what we already read, within our limit
        try:
            form = await request.form(
                max_files=settings.max_files, max_part_size=settings.max_body_bytes
            )
        except Exception as e:  # malformed multipart, too many files
            raise ApiError(400, "bad_multipart", f"cannot parse the multipart body: {e}") from e
        files = [
            (getattr(v, "filename", None) or k, await v.read())
            for k, v in form.multi_items()
            if hasattr(v, "read")
        ]
        if not files:
            raise ApiError(400, "no_file", "no file in the form; send field 'file' (or several)")
        if len(files) > settings.max_files:
            raise ApiError(
                413, "too_many_files", f"at most {settings.max_files} images per request"
            )
        return files
    if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
        return [("body", body)]
    raise ApiError(
        415, "not_image", f"content type {ctype!r}: send an image or multipart/form-data"
    )


PREDICT_DOC = (
    "Multipart form with one or more image files (any field name), or a raw image body "
    "(image/* or application/octet-stream). Returns the top-k labels and probabilities for "
    "each image, in order. Errors: 413 body, image or request pixels too large, 415 not an "
    "image, 422 undecodable/truncated/too many pixels/too slow to decode, 503 busy "
    "(Retry-After), 504 past the request deadline."
)


class _Model:
    """The app's model and its batcher once loaded (in the background), or why not."""

    def __init__(self, load_predictor: Callable[[], Predictor], settings: ServeConfig, observe):
        self.load_predictor, self.settings, self.observe = load_predictor, settings, observe
        self.predictor: Predictor | None = None
        self.batcher: MicroBatcher | None = None
        self.error: str | None = None
        self.decoder: Decoder | None = None

    async def load(self) -> None:
        try:
            predictor = await asyncio.to_thread(self.load_predictor)
            batcher = MicroBatcher(predictor.probabilities, self.settings, self.observe)
            batcher.start()
            self.predictor, self.batcher = predictor, batcher
            log.info("model ready: %s (%s)", predictor.path, predictor.backend)
        except Exception as e:
            self.error = first_line(e)
            log.error("model failed to load: %s", self.error)

    def ready(self) -> tuple[Predictor, MicroBatcher]:
        if self.batcher is None or self.predictor is None:
            reason = self.error and f"model failed to load: {self.error}"
            raise ApiError(
                503, "not_ready", reason or "model is still loading", {"Retry-After": "2"}
            )
        return self.predictor, self.batcher

    async def stop(self) -> None:
        if self.decoder:
            self.decoder.stop()
        if self.batcher:
            await self.batcher.stop()


def create_app(load_predictor: Callable[[], Predictor], settings: ServeConfig | None = None):
    """The ASGI app. The model loads in the background: /readyz is 503 until it is ready,
    and says why if it failed (a damaged model file is refused at load, never a 500 later)."""
    settings = settings or ServeConfig()
    registry, m = _metrics()
    model = _Model(load_predictor, settings, m["batch"].observe)

    @asynccontextmanager
    async def lifespan(app):
        model.decoder = Decoder(settings)  # its semaphore belongs to the server's event loop
        loader = asyncio.create_task(model.load())
        yield
        loader.cancel()
        await model.stop()

    app = FastAPI(
        title="cifar10-resnet50",
        description="Image classification with a fine-tuned ResNet-50. "
        "POST images to /predict; see the web page at /.",
        lifespan=lifespan,
    )
    app.add_middleware(_Observe, requests=m["requests"], latency=m["latency"])
    _install_error_handlers(app)

    @app.post(
        "/predict", summary="Top-k classes for one or several images", description=PREDICT_DOC
    )
    async def predict(request: Request, top_k: int | None = Query(None, ge=1)):
        predictor, batcher = model.ready()
        deadline = Deadline(settings.timeout_s)
        try:
            files = await asyncio.wait_for(_uploads(request, settings), deadline.left())
        except TimeoutError:
            raise timeout_error(settings, "reading the upload") from None
        decoded = await model.decoder.decode(files, predictor.input_size, deadline)
        probs = await batcher.submit(np.stack([d.pixels for d in decoded]), deadline)
        m["images"].inc(len(decoded))
        k = settings.top_k if top_k is None else top_k
        rows = zip(files, decoded, predictor.top_k(probs, k), strict=True)
        return {"predictions": [_prediction(name, d, top) for (name, _), d, top in rows]}

    _add_info_routes(app, model, registry, m)
    return app


def _add_info_routes(app: FastAPI, model: _Model, registry: Any, m: dict[str, Any]) -> None:
    """The routes that only describe the server: liveness, readiness, labels, metrics, page."""

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the model is loaded (else 503 and why)")
    async def readyz():
        p, _ = model.ready()
        return {
            "status": "ready",
            "backend": p.backend,
            "precision": p.precision,
            "model": p.path.name,
            "weights": p.meta.get("weights"),
            "classes": len(p.classes),
            "input_size": p.input_size,
        }

    @app.get("/labels", summary="Class names, in output order")
    async def labels():
        return {"labels": model.ready()[0].classes}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        m["queue"].set(model.batcher.waiting if model.batcher else 0)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page():
        return resources.files(__package__).joinpath("static/index.html").read_text("utf-8")


def _prediction(name: str, d: images_lib.Decoded, top: list[tuple[str, float]]) -> dict:
    return {
        "filename": name,
        "width": d.original_size[0],
        "height": d.original_size[1],
        "top": top_json(top),
    }


_KNOWN_PATHS = {"/predict", "/healthz", "/readyz", "/labels", "/metrics", "/"}


class _Observe:
    """Counts requests by endpoint and status and times them. Plain ASGI: FastAPI's
    ``@app.middleware("http")`` wrapper costs a task and a stream copy per request."""

    def __init__(self, app: Any, requests: Any, latency: Any):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
        status = 500

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.requests.labels(endpoint, str(status)).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - t0)


def check_can_listen(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, so a busy port or a bad host is a one-line error
    before the model loads (uvicorn would log a bind error and exit with code 3)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(address)
    except OSError as e:
        reason = e.strerror or str(e)
        raise UserError(
            f"cannot listen on {host}:{port}: {reason}; pick another --port or --host"
        ) from None


def exposure_warning(host: str) -> str | None:
    """A warning when ``host`` is reachable from other machines: the API has no authentication."""
    try:
        loopback = all(
            ipaddress.ip_address(info[4][0]).is_loopback
            for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        )
    except (OSError, ValueError):
        loopback = False
    if loopback:
        return None
    return (
        f"serving on {host}: other machines can reach this API, and it has no authentication; "
        "put it behind a proxy that authenticates, or use --host 127.0.0.1"
    )


def run(model_path: str, *, model: ModelOptions, settings: ServeConfig) -> None:
    """Serve the model file until stopped (Ctrl-C)."""
    import dataclasses

    import uvicorn

    from . import inference

    def load() -> Predictor:
        options = dataclasses.asdict(model)
        return inference.load(model_path, batch_size=settings.max_batch, **options)

    host, port = settings.host, settings.port
    check_can_listen(host, port)
    if warning := exposure_warning(host):
        log.warning(warning)
    app = create_app(load, settings)
    # uvloop/httptools when installed (uvicorn[standard]): measurably less per-request overhead.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=settings.access_log,
        http=http_protocol(settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes,  # the h11 fallback's bound
    )


def http_protocol(max_header_bytes: int) -> Any:
    """uvicorn's httptools protocol with a bound on the request line + headers, or "h11"
    (which has its own bound) when httptools is missing.

    httptools accumulates a header of any size in memory before calling back (a 64 MiB header
    was accepted), so the bound is enforced on the bytes received while headers are open.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"

    class BoundedHeaders(HttpToolsProtocol):
        _head_bytes = 0
        _in_head = True

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > max_header_bytes:
                log.warning(
                    "request headers from %s over %d bytes; refused (431)",
                    self.client[0] if self.client else "?",
                    max_header_bytes,
                )
                self.transport.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                    b"content-length: 0\r\nconnection: close\r\n\r\n"
                )
                self.transport.close()
                self._in_head, self._head_bytes = False, 0

    return BoundedHeaders
