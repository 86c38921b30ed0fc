"""The `hf-moe-mt` command: a thin argparse front over library functions.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`; the parser
for a subcommand sets `func`, called with the parsed namespace.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .runtime import apply_memory_settings

# subcommand group -> module that registers it (imported only when present, so the command works
# while later parts of the package are still being built)
SUBCOMMAND_MODULES = (
    "hf_moe_mt.data.commands",  # data build | data tokenizer
    "hf_moe_mt.training.commands",  # train
    "hf_moe_mt.tools.commands",  # export | translate | evaluate | quickstart
    "hf_moe_mt.tools.model_commands",  # prune | merge | upcycle | analyze
)

TRAINING_COMMANDS = ("train", "quickstart")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe-mt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in TRAINING_COMMANDS:  # a steady-state loop: process memory settings (runtime.py; opt-outs there)
        apply_memory_settings()
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:  # user errors: one line, no traceback
        print(f"hf-moe-mt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
