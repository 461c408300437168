"""``earlyexit report RUN.json``: render a saved evaluation report as Markdown and a PNG plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    EXIT_BAD_INPUT,
    EXIT_MISSING_FILE,
    EXIT_MISSING_PACKAGE,
    EXIT_OK,
    CliError,
    add_output_arguments,
    emit_json,
    exit_codes_text,
)

NAME = "report"
HELP = "render a JSON evaluation report as a Markdown table and a PNG of the trade-off curves"
DESCRIPTION = (
    "Read RUN.json (written by earlyexit.evaluation.write_report, `earlyexit demo` or "
    "`earlyexit run`), write RUN.md and RUN.png beside it (or into --out) and print the Markdown. "
    "The plot shows MACs (fraction of the full model) against agreement with the full model, and "
    "accuracy when the stream was labelled: one line per method, the oracle and the operating "
    "point marked."
)
EPILOG = f"""examples:
  earlyexit report benchmarks/results/demo_digits.json
  earlyexit report run.json --out rendered/ --name run1
  earlyexit report run.json --json     # headline figures + written paths, as JSON

exit codes:
{exit_codes_text()}"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN.json", help="a report written as JSON")
    parser.add_argument("--out", metavar="DIR", help="where to write (default: beside RUN.json)")
    parser.add_argument("--name", metavar="NAME", help="file stem (default: RUN's stem)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..errors import MissingDemoPackageError
    from ..evaluation.plot import plot_tradeoff
    from ..evaluation.report import REQUIRED_KEYS, load_report, render_markdown

    src = Path(args.run)
    try:
        report = load_report(src)
    except FileNotFoundError:
        raise CliError(f"report file not found: {src}", EXIT_MISSING_FILE) from None
    except ValueError as err:
        raise CliError(str(err), EXIT_BAD_INPUT) from None
    except OSError as err:  # e.g. no permission: the file's problem, not a bug
        raise CliError(f"cannot read {src}: {err.strerror or err}", EXIT_BAD_INPUT) from None
    out = Path(args.out) if args.out else src.parent
    stem = args.name or src.stem
    out.mkdir(parents=True, exist_ok=True)
    png = None
    try:
        if not args.no_plot:
            try:
                png = plot_tradeoff(report, out / f"{stem}.png")
            except MissingDemoPackageError as err:
                raise CliError(f"{err} (or pass --no-plot)", EXIT_MISSING_PACKAGE) from None
        markdown = render_markdown(report, plot_name=png.name if png else None)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        # load_report checked the keys; a value of the wrong kind (a string for a rate, ...)
        # means a hand-edited or foreign file. --debug still shows the traceback.
        if args.debug:
            raise
        raise CliError(
            f"{src} has the keys of a report but values of the wrong kind "
            f"({type(err).__name__}: {err}); was it edited by hand?",
            EXIT_BAD_INPUT,
        ) from None
    md = out / f"{stem}.md"
    md.write_text(markdown)
    if args.json:
        emit_json(
            {
                "markdown": str(md),
                "png": str(png) if png else None,
                **{k: report[k] for k in REQUIRED_KEYS if k != "exits"},
                "exits": report["exits"],
            }
        )
    else:
        print(markdown, end="")
    return EXIT_OK
