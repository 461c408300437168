"""The ``earlyexit`` command line: one subcommand per small module in :mod:`earlyexit._cli`.

Each subcommand module defines ``NAME``, ``HELP`` (one line), ``DESCRIPTION``, ``EPILOG``
(examples), ``add_arguments(parser)`` and ``run(args) -> int``; listing its import path in
:data:`SUBCOMMANDS` (or calling :func:`register_subcommand`) adds it, so ``demo`` and ``run`` slot
in without touching the others. Subcommands import timm/torchvision/fvcore inside ``run``, so
``--help`` stays quick.

Exit codes (also in ``earlyexit --help``): 0 ok, 1 unexpected error, 2 usage error (bad option or
malformed value), 3 a file is missing, 4 unknown model, 5 invalid input (weights that do not fit
the model, an input size it cannot take, a file that is not a report), 6 a package the command
needs is not installed (``pip install 'earlyexit[demo]'`` or ``'earlyexit[serve]'``), 130
interrupted.

Example:
    >>> main(["profile", "timm:resnet18", "--input-size", "64", "--json"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from ._cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_MISSING_PACKAGE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    exit_codes_text,
)
from .errors import MissingPackageError

__all__ = ["SUBCOMMANDS", "build_parser", "main", "register_subcommand"]

#: Import paths of the subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS: list[str] = [
    "earlyexit._cli.demo",
    "earlyexit._cli.run",
    "earlyexit._cli.serve",
    "earlyexit._cli.profile",
    "earlyexit._cli.bench",
    "earlyexit._cli.report",
]

_REQUIRED = ("NAME", "HELP", "add_arguments", "run")


def register_subcommand(module_path: str) -> None:
    """Add a subcommand module (see the module docstring for what it must define).

    Example:
        >>> register_subcommand("earlyexit._cli.report")  # already there: no change
    """
    if module_path not in SUBCOMMANDS:
        SUBCOMMANDS.append(module_path)


def _load(module_path: str) -> ModuleType:
    module = importlib.import_module(module_path)
    missing = [a for a in _REQUIRED if not hasattr(module, a)]
    if missing:
        raise RuntimeError(f"subcommand module {module_path} lacks {', '.join(missing)}")
    return module


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand.

    Example:
        >>> build_parser().parse_args(["report", "run.json"]).command
        'report'
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="earlyexit",
        description=(
            "Early exits for pretrained timm/torchvision classifiers: inspect where exits go and "
            "what they cost (profile), time wrapped vs unwrapped models (bench), serve them over "
            "HTTP while they learn (serve), and render evaluation reports (report)."
        ),
        epilog=(
            "examples:\n"
            "  earlyexit profile timm:resnet50\n"
            "  earlyexit bench timm:resnet50 --batch-sizes 1,32 --json > bench.json\n"
            "  earlyexit report benchmarks/results/demo_digits.json\n\n"
            "models are named timm:NAME or torchvision:NAME (a bare NAME is looked up in timm,\n"
            "then torchvision); weights are random unless --weights PATH is given.\n\n"
            f"exit codes:\n{exit_codes_text()}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"earlyexit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for path in SUBCOMMANDS:
        module = _load(path)
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            epilog=getattr(module, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it).

    Example:
        >>> main(["report", "missing.json"])  # doctest: +SKIP
        3
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as stop:  # argparse: --help/--version (0) or a usage error (2)
        return int(stop.code) if isinstance(stop.code, int) else EXIT_USAGE
    try:
        return int(args._run(args) or EXIT_OK)
    except CliError as err:
        print(f"earlyexit {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except MissingPackageError as err:  # a package of an optional extra is not installed
        print(f"earlyexit {args.command}: error: {err}", file=sys.stderr)
        return EXIT_MISSING_PACKAGE
    except BrokenPipeError:  # e.g. `earlyexit profile ... | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("earlyexit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug, not a user error: say so, with the type
        if getattr(args, "debug", False):
            raise
        print(
            f"earlyexit {args.command}: unexpected error ({type(err).__name__}): {err}\n"
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
