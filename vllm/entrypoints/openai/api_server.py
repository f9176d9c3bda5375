"""The OpenAI-compatible HTTP server (FastAPI under uvicorn).

    vllm serve MODEL [flags]
    python -m vllm.entrypoints.openai.api_server --model MODEL [flags]

The model loads before the port accepts connections; the port is bound first, so a
port in use fails at once. SIGTERM or Ctrl-C: the server stops accepting, every
in-flight request is aborted (streams end with an error event), the workers exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import prometheus_client
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from vllm import __version__
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError
from vllm.engine.metrics import LoggingStatLogger, PrometheusStatLogger
from vllm.entrypoints.chat_utils import load_chat_template
from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from vllm.entrypoints.openai.serving_chat import OpenAIServingChat
from vllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from vllm.entrypoints.openai.serving_engine import OpenAIError, engine_dead
from vllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from vllm.logger import init_logger
from vllm.utils import FlexibleArgumentParser

logger = init_logger(__name__)

router = APIRouter()


def _error(error: OpenAIError) -> Response:
    body = error.response.model_dump_json()
    return Response(body, error.status_code, media_type="application/json")


def _respond(result: BaseModel | Any) -> Response:
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    return StreamingResponse(result, media_type="text/event-stream")


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``, cancelling it (which aborts its engine requests) if the client leaves
    first. A streamed response watches for that itself once it starts."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening
    return _respond(task.result())


@router.get("/health")
async def health(raw_request: Request) -> Response:
    try:
        await raw_request.app.state.engine.check_health()
    except EngineDeadError:
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    body = prometheus_client.generate_latest(raw_request.app.state.metrics_registry)
    return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def show_models(raw_request: Request) -> Response:
    serving = raw_request.app.state.serving_completion
    cards = [
        ModelCard(
            id=name, root=serving.engine.model_config.model, max_model_len=serving.max_model_len
        )
        for name in serving.served_model_names
    ]
    return _respond(ModelList(data=cards))


@router.post("/tokenize")
async def tokenize(
    request: TokenizeCompletionRequest | TokenizeChatRequest, raw_request: Request
) -> Response:
    return _respond(raw_request.app.state.serving_tokenization.tokenize(request))


@router.post("/detokenize")
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> Response:
    return _respond(raw_request.app.state.serving_tokenization.detokenize(request))


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    serving = raw_request.app.state.serving_completion
    return await _until_disconnect(raw_request, serving.create_completion(request))


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    serving = raw_request.app.state.serving_chat
    return await _until_disconnect(raw_request, serving.create_chat_completion(request))


async def _openai_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return _error(exc)


async def _engine_dead(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineDeadError)
    return _error(engine_dead(exc))


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    messages, param = [], None
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        if err.get("type") == "json_invalid":
            messages.append(f"The request body is not valid JSON: {err.get('msg')}")
            continue
        field = ".".join(loc) or "body"
        param = param or field
        messages.append(f"{field}: {err.get('msg')} (got {err.get('input')!r})")
    return _error(OpenAIError("; ".join(messages) or "Invalid request.", param=param))


async def _unexpected_error(_: Request, exc: Exception) -> Response:
    logger.exception("Unexpected error while serving a request")
    return _error(OpenAIError(f"{type(exc).__name__}: {exc}", 500, "InternalServerError"))


class AuthenticationMiddleware:
    """401 for a /v1 route without ``Authorization: Bearer <api key>``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            given = Headers(scope=scope).get("authorization", "").encode()
            if path.startswith("/v1") and not secrets.compare_digest(given, self.expected):
                response = _error(
                    OpenAIError(
                        "Invalid or missing API key: send 'Authorization: Bearer <key>' with "
                        "the key the server was started with (--api-key).",
                        401,
                        "AuthenticationError",
                    )
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(args: argparse.Namespace, engine: AsyncLLMEngine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        # Here, not after serve(): uvicorn re-raises a captured SIGTERM once it returns.
        await engine.shutdown()

    docs = {} if not args.disable_fastapi_docs else dict(docs_url=None, redoc_url=None,
                                                         openapi_url=None)  # fmt: skip
    app = FastAPI(lifespan=lifespan, root_path=args.root_path or "", **docs)
    app.include_router(router)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=args.allowed_origins,
        allow_credentials=args.allow_credentials,
        allow_methods=args.allowed_methods,
        allow_headers=args.allowed_headers,
    )
    if args.api_key:
        app.add_middleware(AuthenticationMiddleware, api_key=args.api_key)
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(EngineDeadError, _engine_dead)
    app.add_exception_handler(Exception, _unexpected_error)
    init_app_state(app, args, engine)
    return app


def init_app_state(app: FastAPI, args: argparse.Namespace, engine: AsyncLLMEngine) -> None:
    names = args.served_model_name or [args.model]
    if isinstance(names, str):
        names = [names]
    registry = prometheus_client.CollectorRegistry()
    engine.engine.add_logger(PrometheusStatLogger(registry, names[0]))
    if not args.disable_log_stats:
        engine.engine.add_logger(LoggingStatLogger())
    common = dict(
        engine=engine,
        served_model_names=names,
        chat_template=load_chat_template(args.chat_template),
        enable_log_requests=args.enable_log_requests,
        max_log_len=args.max_log_len,
    )
    state = app.state
    state.engine = engine
    state.metrics_registry = registry
    state.serving_completion = OpenAIServingCompletion(**common)
    state.serving_chat = OpenAIServingChat(**common, response_role=args.response_role)
    state.serving_tokenization = OpenAIServingTokenization(**common)


class _Server(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT abort every request at once, so that streams end and
    the graceful shutdown does not wait for them to finish generating."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logger.info("Received %s; shutting down.", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._on_exit)
        super().handle_exit(sig, frame)


def create_server_socket(host: str | None, port: int) -> socket.socket:
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host or "", port))
    except OSError as e:
        sock.close()
        raise OSError(
            e.errno, f"Cannot listen on {host or '*'}:{port}: {e.strerror}; pick another --port."
        ) from e
    return sock


async def run_server(args: argparse.Namespace) -> None:
    validate_args(args)
    sock = create_server_socket(args.host, args.port)
    engine = None
    try:
        engine = AsyncLLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
        app = build_app(args, engine)
        config = uvicorn.Config(
            app,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            timeout_keep_alive=5,
        )
        reason = "The server is shutting down."
        server = _Server(config, on_exit=lambda: engine.stop_accepting(reason))
        logger.info("Serving %s on http://%s:%d", args.model, args.host or "0.0.0.0", args.port)
        await server.serve(sockets=[sock])
    finally:
        if engine is not None:
            await engine.shutdown()
        sock.close()


def validate_args(args: argparse.Namespace) -> None:
    """Refuse a bad flag before the model loads."""
    if not args.model:
        raise SystemExit("No model given: vllm serve MODEL (a local Hugging Face model directory).")
    try:
        load_chat_template(args.chat_template)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from e
    if args.api_key is None:
        args.api_key = os.environ.get("VLLM_API_KEY") or None
    if not 0 <= args.port < 65536:
        raise SystemExit(f"--port {args.port} is not a TCP port (0-65535).")


def make_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(description="vLLM's OpenAI-compatible server.")
    return make_arg_parser(parser)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    serve(make_parser().parse_args(argv))


def serve(args: argparse.Namespace) -> None:
    """Run the server until SIGTERM or Ctrl-C."""
    try:
        asyncio.run(run_server(args))
    except KeyboardInterrupt:
        logger.info("Server stopped.")


if __name__ == "__main__":
    main()
