"""The CLI parser every entry point and example script builds its flags on."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["FlexibleArgumentParser"]


class FlexibleArgumentParser(argparse.ArgumentParser):
    """ArgumentParser that accepts ``--foo_bar`` as well as ``--foo-bar``, as upstream vLLM.

    Only the option name is rewritten (the part before any ``=``); values are left alone,
    and nothing after a bare ``--`` is touched.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # parse_args() goes through here too, so both entry points see normalized names.
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args(_normalize_option_names(args), namespace)


def _normalize_option_names(args: Sequence[str]) -> list[str]:
    out: list[str] = []
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--":  # everything after is positional: keep it verbatim
            out.extend(args[i:])
            break
        if arg.startswith("--"):
            key, sep, value = arg.partition("=")
            arg = "--" + key[2:].replace("_", "-") + sep + value
        out.append(arg)
    return out
