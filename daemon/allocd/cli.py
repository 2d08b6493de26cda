"""`allocd run | emulator | demo | send`: the command line. Each subcommand lives in the module it drives."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence

from allocd import __version__
from allocd.errors import ConfigError, StartupError

__all__ = ["main"]

# subcommand -> (module, help). Each module exposes `add_arguments(parser)` and
# `async run_command(args) -> int`.
SUBCOMMANDS = {
    "run": ("allocd.daemon", "run the daemon: Kafka (or the sidecar spool) -> rollup -> CloudZero"),
    "emulator": ("allocd.cloudzero.emulator", "run the local CloudZero API emulator"),
    "send": ("allocd.cloudzero.send", "send records from a JSON/NDJSON file (ops tool)"),
    "demo": ("allocd.demo", "run the embedded stack end to end: broker, emulator, daemon, producer"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (start-up stays fast and a broken
    optional module cannot stop `allocd run`)."""
    parser = argparse.ArgumentParser(prog="allocd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"allocd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return asyncio.run(module.run_command(args))
    except ConfigError as exc:
        print(f"allocd: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"allocd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
