"""The `nicemu` command: nicemu's device commands (nicemu.cli.SUBCOMMANDS: show, serve, up)
plus the lab's own (lab.commands.COMMANDS). The device package knows nothing of the lab;
the lab reuses its parser pieces and its error handling."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from lab.commands import COMMANDS
from nicemu import cli as device_cli

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """nicemu's parser with one subcommand per row of lab.commands added after its own."""
    parser = device_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for _name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        mod.add_parser(sub).set_defaults(run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return device_cli.main(argv, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
