"""The server's flags (upstream vLLM's names), added in front of every ``EngineArgs`` flag."""

from __future__ import annotations

import argparse
import json

from vllm.engine.arg_utils import EngineArgs


def _json_list(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {value!r}: {e}") from e
    if not isinstance(parsed, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {value!r}")
    return parsed


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's flags, then the engine's, to ``parser``."""
    group = parser.add_argument_group("Server")

    def add(flag: str, help: str, **kwargs) -> None:
        if kwargs.get("default") not in (None, False) and kwargs.get("action") != "store_true":
            help += " (default: %(default)s)"
        group.add_argument(flag, help=help, **kwargs)

    add("--host", "Address to listen on; all interfaces when not given.", default=None)
    add("--port", "Port to listen on.", type=int, default=8000)
    add(
        "--uvicorn-log-level",
        "Log level of uvicorn (the HTTP server).",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    add(
        "--disable-uvicorn-access-log",
        "Do not log a line per HTTP request.",
        action="store_true",
    )
    add(
        "--api-key",
        "Require this key as 'Authorization: Bearer KEY' on every /v1 route (also read from "
        "the VLLM_API_KEY environment variable).",
        default=None,
    )
    add(
        "--chat-template",
        "Chat template for /v1/chat/completions: a Jinja file, or the template itself. "
        "Defaults to the tokenizer's own.",
        default=None,
    )
    add("--response-role", "Role of the generated chat message.", default="assistant")
    add("--root-path", "ASGI root_path, when behind a path-prefixing proxy.", default=None)
    add("--ssl-keyfile", "TLS key file (serve HTTPS).", default=None)
    add("--ssl-certfile", "TLS certificate file (serve HTTPS).", default=None)
    add("--allow-credentials", "CORS: allow credentials.", action="store_true")
    add("--allowed-origins", "CORS: allowed origins (JSON list).", type=_json_list, default=["*"])
    add("--allowed-methods", "CORS: allowed methods (JSON list).", type=_json_list, default=["*"])
    add("--allowed-headers", "CORS: allowed headers (JSON list).", type=_json_list, default=["*"])
    add(
        "--enable-log-requests",
        "Log each request's id, prompt length and sampling parameters.",
        action="store_true",
    )
    add(
        "--disable-log-requests",
        "Do not log requests (the default; kept for upstream's command lines).",
        action="store_true",
    )
    add(
        "--max-log-len",
        "Most prompt characters shown in a request's log line.",
        type=int,
        default=None,
    )
    add(
        "--disable-fastapi-docs",
        "Do not serve /docs, /redoc and /openapi.json.",
        action="store_true",
    )
    return EngineArgs.add_cli_args(parser)
