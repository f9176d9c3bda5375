"""``vllm <subcommand>``: one argparse sub-parser per command, all with vLLM's flag names.

A command is (name, help, add_arguments(parser), run(args)); add new ones to COMMANDS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from vllm import __version__
from vllm.utils import FlexibleArgumentParser


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], None]


def _save_sharded_state_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vllm.entrypoints.save_sharded_state import make_parser

    return make_parser(parser)


def _save_sharded_state(args: argparse.Namespace) -> None:
    from vllm.entrypoints.save_sharded_state import main

    main(args)


def _reshard_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vllm.entrypoints.reshard import DESCRIPTION, add_args

    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return add_args(parser)


def _reshard(args: argparse.Namespace) -> None:
    from vllm.entrypoints.reshard import main

    main(args)


def _serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vllm.entrypoints.openai.cli_args import make_arg_parser

    parser.add_argument(
        "model_tag",
        nargs="?",
        help="The model to serve: a local Hugging Face model directory (same as --model).",
    )
    return make_arg_parser(parser)


def _serve(args: argparse.Namespace) -> None:
    from vllm.entrypoints.openai.api_server import serve

    if args.model_tag is not None:
        if args.model and args.model != args.model_tag:
            sys.exit(
                f"vllm serve got two models: {args.model_tag!r} and --model {args.model!r}; "
                "give one."
            )
        args.model = args.model_tag
    serve(args)


COMMANDS: list[Command] = [
    Command(
        "serve",
        "Start the OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
        "/v1/models, /tokenize, /health, /metrics) for a model.",
        _serve_args,
        _serve,
    ),
    Command(
        "save-sharded-state",
        "Save a model so that each tensor-parallel rank later loads only its own files "
        "(load_format='sharded_state'); same flags as "
        "examples/offline_inference/save_sharded_state.py.",
        _save_sharded_state_args,
        _save_sharded_state,
    ),
    Command(
        "reshard",
        "Rewrite a sharded-state or Hugging Face checkpoint as the sharded-state files of "
        "another tensor_parallel_size, without an engine or a GPU.",
        _reshard_args,
        _reshard,
    ),
]


def make_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(prog="vllm", description="vLLM-compatible inference engine.")
    parser.add_argument("-v", "--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="subcommand", metavar="<command>")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(dispatch=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "dispatch", None) is None:
        parser.print_help()
        sys.exit(2)
    args.dispatch(args)


if __name__ == "__main__":
    main()
