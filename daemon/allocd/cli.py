"""`allocd run | emulator | demo | send`: the command line, and the one `main` of every command (also
`python -m allocd`). Each subcommand lives in the module it drives; errors become exit codes here only:
2 for bad configuration or input (nothing was done), 1 for a dependency that failed, 130 for Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence

from allocd import __version__
from allocd.cloudzero.records import RecordError
from allocd.errors import ConfigError, DeliveryError, StartupError

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


# An error that reaches the top → (exit code, what the message says happened).
EXIT_CODES: tuple[tuple[type[BaseException], int, str], ...] = (
    (ConfigError, 2, ""),
    (RecordError, 2, "nothing sent: "),
    (StartupError, 1, ""),
    (DeliveryError, 1, "nothing delivered: "),
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(args._module)
    prog = "allocd" if args.command == "run" else f"allocd {args.command}"
    try:
        code: int = asyncio.run(module.run_command(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        for kind, exit_code, said in EXIT_CODES:
            if isinstance(exc, kind):
                print(f"{prog}: {said}{exc}", file=sys.stderr)
                return exit_code
        raise
    return code


if __name__ == "__main__":
    sys.exit(main())
