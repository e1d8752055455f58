"""`vlserve serve | bench | make-tiny-model | launch`: parse flags, build config objects, run.

Each room owns its own flags in a small ``cli`` module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, and imports a room lazily so that
``vlserve bench`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with add_arguments/run, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("vlserve.api.cli", "serve a Qwen3-VL model behind an OpenAI-compatible API"),
    "bench": (
        "vlserve.bench.cli",
        "benchmark OpenAI-compatible chat endpoints with JSONL datasets",
    ),
    "make-tiny-model": ("vlserve.testing.cli", "write a tiny random-weights Qwen3-VL checkpoint"),
    "launch": ("vlserve.launch.cli", "one server per device behind an nginx load balancer"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vlserve {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv else None
    for name, (module_name, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen room is imported: the others may need packages not installed here.
        if name == wanted:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(_COMMANDS[args.command][0])
    return int(module.run(args) or 0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlserve")
    except PackageNotFoundError:
        return "0+unknown"


if __name__ == "__main__":
    sys.exit(main())
