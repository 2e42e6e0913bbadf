"""The gateway's ASGI app: one route per protocol endpoint, health, the page; `run` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from reward_client import AsyncRewardClient
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from reward_server.gateway.batching import Coalescer
from reward_server.gateway.core import GatewayError
from reward_server.gateway.lifetime import ClientGone, request_timeout, unless_disconnected
from reward_server.gateway.metrics import GatewayMetrics
from reward_server.gateway.options import GatewayOptions
from reward_server.gateway.protocols import Context, native, nim, openrlhf, tei, vllm

_LOGGER = logging.getLogger(__name__)
PROTOCOLS = (openrlhf, vllm, nim, tei, native)
PAGE = Path(__file__).parent / "static" / "index.html"
GRACEFUL_SHUTDOWN_S = 30  # after SIGTERM, requests in flight get this long (deploy/check.py budgets it)
# nginx's "client closed request": what the gateway's metrics record for a request whose client went
# (the client never sees it).
CLIENT_CLOSED_REQUEST = 499


class _State:
    client: AsyncRewardClient
    context: Context
    metrics: GatewayMetrics


async def read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON, read no further than `limit` bytes.

    Raises:
        GatewayError: over the limit (413), or not JSON.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise GatewayError(f"the request body is {declared} bytes, over the limit of {limit} bytes", "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(f"the request body is over the limit of {limit} bytes", "too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise GatewayError(f"the request body is not valid JSON ({str(err)[:120]})") from None


def _authorised(request: Request, api_key: str | None) -> bool:
    if not api_key:
        return True
    bearer = request.headers.get("authorization", "")
    given = bearer[7:].strip() if bearer.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    return bool(given) and hmac.compare_digest(given.encode(), api_key.encode())


def _endpoint(protocol: Any, handler: Callable[[Any, Context], Awaitable[Any]], options: GatewayOptions,
              state: _State) -> Callable[[Request], Awaitable[Response]]:
    status_of = getattr(protocol, "status", lambda err: err.status)
    name = protocol.__name__.rsplit(".", 1)[-1]

    async def answer(request: Request, started: float) -> Response:
        try:
            if not _authorised(request, options.api_key):
                return JSONResponse({"detail": "Unauthorized"}, status_code=401)
            # Counted from the request's arrival, as the caller counts it.
            deadline = started + request_timeout(request.headers, options.timeout_s)
            body = await read_json(request, options.max_body_bytes)
            context = dataclasses.replace(state.context, protocol=name, endpoint=request.url.path, deadline=deadline)
            return JSONResponse(await unless_disconnected(request.receive, handler(body, context)))
        except GatewayError as err:
            if err.kind == "timeout":
                state.metrics.cancelled(name, request.url.path, "deadline")
            if err.kind != "invalid_input":
                _LOGGER.warning("%s: %s", request.url.path, err.message)
            return JSONResponse(protocol.error_body(err), status_code=status_of(err))
        except (ClientGone, ClientDisconnect):
            state.metrics.cancelled(name, request.url.path, "disconnected")
            _LOGGER.debug("%s: the client disconnected before its answer; its work was withdrawn", request.url.path)
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def endpoint(request: Request) -> Response:
        started = asyncio.get_running_loop().time()
        response = await answer(request, started)
        state.metrics.request(name, request.url.path, response.status_code,
                              asyncio.get_running_loop().time() - started)
        return response

    return endpoint


def _client(options: GatewayOptions) -> AsyncRewardClient:
    """The SDK client of the server. Each gRPC request, its retries included, is bounded by the
    gateway's timeout, which the server learns too (Triton's `timeout`) and drops work past it."""
    settings: dict[str, Any] = dict(batch_size=options.batch_size, max_in_flight=options.max_in_flight,
                                    timeout_s=options.timeout_s, tls=options.tls)
    if "deadline_s" in inspect.signature(AsyncRewardClient).parameters:  # SDKs before issue 30 bound attempts only
        settings["deadline_s"] = options.timeout_s
    return AsyncRewardClient(options.url, **settings)


def create_app(options: GatewayOptions) -> Starlette:
    """The gateway app; its gRPC client is made when the app starts (inside the event loop)."""
    state = _State()
    state.metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.client = _client(options)
        coalescer = Coalescer(state.client, max_delay_s=options.batch_delay_ms / 1000.0,
                              max_calls=options.max_in_flight, metrics=state.metrics)
        state.context = Context(coalescer, options.model_name, options.max_items, metrics=state.metrics)
        app.state.coalescer, app.state.metrics = coalescer, state.metrics
        try:
            yield
        finally:
            await state.client.close()

    async def ready(request: Request) -> Response:
        ok = await state.client.is_ready()
        return JSONResponse({"status": "ready" if ok else "unavailable", "server": options.url},
                            status_code=200 if ok else 503)

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": options.model_name, "object": "model",
                                                          "owned_by": "reward-server"}]})

    async def page(request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html")

    async def metrics(request: Request) -> Response:
        text, content_type = state.metrics.render()
        return Response(text, media_type=content_type)

    routes = [Route("/", page, methods=["GET"]), Route("/health", ready, methods=["GET"]),
              Route("/health/ready", ready, methods=["GET"]), Route("/health/live", live, methods=["GET"]),
              Route("/v1/models", models, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    for protocol in PROTOCOLS:
        for path, handler in protocol.ROUTES.items():
            routes.append(Route(path, _endpoint(protocol, handler, options, state), methods=["POST"]))
    return Starlette(routes=routes, lifespan=lifespan)


def run(options: GatewayOptions) -> int:
    """Serve the gateway until SIGINT/SIGTERM (uvicorn finishes the requests in flight)."""
    import uvicorn

    config = uvicorn.Config(create_app(options), host=options.host, port=options.port, log_level="info",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False)
    server = uvicorn.Server(config)
    _LOGGER.info("gateway for %s on http://%s:%d (page at /, OpenRLHF /get_reward, vLLM /classify and /pooling, "
                 "SGLang /v1/embeddings, NIM /v1/chat/completions, TEI /predict)", options.url, options.host,
                 options.port)
    asyncio.run(server.serve())
    return 0
