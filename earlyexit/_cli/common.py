"""Shared pieces of the subcommands: exit codes, errors, model specs, sizes, output.

Example:
    >>> parse_input_size("224")
    (3, 224, 224)
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MISSING_FILE = 3
EXIT_UNKNOWN_MODEL = 4
EXIT_BAD_INPUT = 5
EXIT_MISSING_PACKAGE = 6
EXIT_INTERRUPTED = 130

_CODES = (
    (EXIT_OK, "success"),
    (EXIT_ERROR, "unexpected error (a bug: please report it with --debug output)"),
    (EXIT_USAGE, "usage error: unknown option, malformed value (e.g. --input-size 0)"),
    (
        EXIT_MISSING_FILE,
        "a file given on the command line does not exist, or a file shipped with the package is "
        "missing or corrupt (reinstall)",
    ),
    (EXIT_UNKNOWN_MODEL, "unknown model name"),
    (
        EXIT_BAD_INPUT,
        "invalid input: weights that do not fit the model, an input size it cannot take, "
        "a file that is not a report",
    ),
    (
        EXIT_MISSING_PACKAGE,
        "a package the command needs is not installed (the message says what to pip install)",
    ),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)


def exit_codes_text() -> str:
    """The exit codes, one per line, for ``--help`` epilogs."""
    return "\n".join(f"  {code:>3}  {what}" for code, what in _CODES)


class CliError(Exception):
    """A user-facing error with its exit code; the message says what to do next."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------ values


def parse_input_size(text: str) -> tuple[int, int, int]:
    """``"224"``, ``"224x224"``, ``"3x224x224"`` or ``"3,224,224"`` -> ``(C, H, W)``.

    Raises ``argparse.ArgumentTypeError`` (a usage error, exit code 2) when malformed.

    Example:
        >>> parse_input_size("3x64x48")
        (3, 64, 48)
    """
    compact = re.sub(r"\s+", "", text)
    values = (
        [int(p) for p in re.split(r"[xX,]", compact)]
        if re.fullmatch(r"\d+([xX,]\d+){0,2}", compact)
        else []
    )
    if len(values) == 1:
        values = [3, values[0], values[0]]
    elif len(values) == 2:
        values = [3, *values]
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use H (square), HxW or CxHxW with positive integers, e.g. 224 or 3x224x224"
        )
    return (values[0], values[1], values[2])


def parse_int_list(text: str) -> list[int]:
    """``"1,32"`` -> ``[1, 32]`` (positive integers).

    Example:
        >>> parse_int_list("1, 8,32")
        [1, 8, 32]
    """
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,32, got {text!r}")
    return values


def parse_exits(text: str) -> str | list[str | int]:
    """``"auto"`` or a comma list of module names and candidate indices.

    Example:
        >>> parse_exits("0,layer3.0")
        [0, 'layer3.0']
    """
    if text.strip() == "auto":
        return "auto"
    items: list[str | int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        items.append(int(part) if re.fullmatch(r"-?\d+", part) else part)
    if not items:
        raise argparse.ArgumentTypeError("--exits needs 'auto' or names/indices like 0,2,layer3.0")
    return items


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ------------------------------------------------------------------------------------ models


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (required), ``--weights`` or ``--pretrained``, ``--num-classes``: the model
    flags of ``run`` and ``serve``, which build it with :func:`build_model`."""
    parser.add_argument(
        "--model", required=True, metavar="MODEL", help="timm:NAME or torchvision:NAME"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--weights",
        metavar="PATH",
        help="local state_dict/checkpoint (.pth, .pt, .bin, .safetensors)",
    )
    source.add_argument(
        "--pretrained",
        action="store_true",
        help="the library's pretrained weights (needs a network)",
    )
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        default=1000,
        metavar="N",
        help="classes of the model (default 1000)",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``MODEL``, ``--weights``, ``--input-size``, ``--num-classes``, ``--exits``, ``--num-exits``, ``--head``."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="timm:NAME or torchvision:NAME (a bare NAME is looked up in timm, then torchvision)",
    )
    parser.add_argument(
        "--weights",
        metavar="PATH",
        help="local state_dict or checkpoint (.pt/.pth/.bin via torch.load, or .safetensors); "
        "default: random weights (no download)",
    )
    parser.add_argument(
        "--input-size",
        type=parse_input_size,
        metavar="SIZE",
        help="input size: H, HxW or CxHxW (default: the model's own, e.g. 224)",
    )
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        default=1000,
        metavar="N",
        help="classes of the classifier to build (default 1000)",
    )
    parser.add_argument(
        "--exits",
        type=parse_exits,
        default="auto",
        metavar="LIST",
        help="'auto' (default) or comma-separated module names / candidate indices, e.g. 0,3,layer3.0",
    )
    parser.add_argument(
        "--num-exits",
        type=positive_int,
        default=4,
        metavar="N",
        help="how many exits 'auto' places (default 4)",
    )
    parser.add_argument(
        "--head",
        default="linear",
        metavar="KIND",
        help="exit head kind: linear (default), mlp, conv",
    )


def add_output_arguments(parser: argparse.ArgumentParser, *, progress: bool = False) -> None:
    """``--json`` (and ``--no-progress`` for long commands), ``--debug``."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="print machine-readable JSON only (nothing else on stdout)",
    )
    if progress:
        parser.add_argument(
            "--no-progress", action="store_true", help="no progress bars (they go to stderr)"
        )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")


def _all_model_names() -> list[str]:
    import timm
    import torchvision

    return [f"timm:{n}" for n in timm.list_models()] + [
        f"torchvision:{n}" for n in torchvision.models.list_models()
    ]


def resolve_model_name(spec: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ``("timm", "resnet50")``; a bare name is looked up in timm, then
    torchvision. Unknown names raise :class:`CliError` (exit 4) with close matches.

    Example:
        >>> resolve_model_name("torchvision:resnet18")
        ('torchvision', 'resnet18')
    """
    import timm
    import torchvision

    source, sep, name = spec.partition(":")
    if not sep:
        source, name = "", spec
    if source not in ("", "timm", "torchvision"):
        raise CliError(
            f"unknown model source {source!r} in {spec!r}: use timm:NAME or torchvision:NAME",
            EXIT_UNKNOWN_MODEL,
        )
    if source in ("", "timm") and timm.is_model(name):
        return "timm", name
    if source in ("", "torchvision") and name in torchvision.models.list_models():
        return "torchvision", name
    close = difflib.get_close_matches(
        spec if source else f"timm:{spec}", _all_model_names(), n=3, cutoff=0.6
    )
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    where = source or "timm or torchvision"
    raise CliError(f"unknown model {spec!r} (not in {where}){hint}", EXIT_UNKNOWN_MODEL)


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise CliError(
                f"{path} is not a readable safetensors file: {err}", EXIT_BAD_INPUT
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CliError(
            f"could not read weights from {path} ({type(err).__name__}: {err}); expected a "
            "state_dict saved with torch.save(model.state_dict(), path) or a .safetensors file",
            EXIT_BAD_INPUT,
        ) from None
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CliError(
            f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of parameter names "
            "to tensors)",
            EXIT_BAD_INPUT,
        )
    prefix = "module."  # saved from DataParallel / DDP
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_weights(model: Any, path: str) -> None:
    """Load a local checkpoint into ``model`` strictly; clear errors when missing or not fitting."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"weights file not found: {path}", EXIT_MISSING_FILE)
    state = _read_state_dict(file)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()
        detail = "; ".join(line.strip() for line in first[1:4] if line.strip())
        raise CliError(
            f"the weights in {path} do not fit this model ({detail or first[0]}). Check the model "
            "name and --num-classes (the checkpoint's classifier decides it).",
            EXIT_BAD_INPUT,
        ) from None


def build_model(
    spec: str, *, num_classes: int = 1000, weights: str | None = None, pretrained: bool = False
) -> tuple[Any, str]:
    """Build ``spec`` with random weights, a local ``weights`` file, or the library's
    ``pretrained`` weights (needs a network), in eval mode; returns ``(model, "source:name")``.

    Example:
        >>> model, label = build_model("timm:resnet18", num_classes=10)  # doctest: +SKIP
    """
    source, name = resolve_model_name(spec)
    if weights is not None and not Path(weights).is_file():
        raise CliError(f"weights file not found: {weights}", EXIT_MISSING_FILE)
    try:
        if source == "timm":
            import timm

            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
        else:
            import torchvision

            tv_weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
            extra = {} if pretrained else {"num_classes": num_classes}
            model = torchvision.models.get_model(name, weights=tv_weights, **extra)
    except Exception as err:
        if not pretrained:
            raise
        raise CliError(
            f"could not get pretrained weights for {spec} ({type(err).__name__}: {err}); "
            "without a network, download them elsewhere and pass --weights PATH",
            EXIT_BAD_INPUT,
        ) from None
    if weights is not None:
        load_weights(model, weights)
    return model.eval(), f"{source}:{name}"


def wrap_model(model: Any, args: argparse.Namespace, **kwargs: Any) -> Any:
    """Wrap with the CLI's exit/head/size options; library errors become exit codes."""
    from ..errors import ConfigError, UnsupportedModelError
    from ..wrapping import wrap

    try:
        return wrap(
            model,
            exits=args.exits,
            head=args.head,
            num_exits=args.num_exits,
            input_size=args.input_size,
            **kwargs,
        )
    except UnsupportedModelError as err:
        size = f" at input size {args.input_size}" if args.input_size else ""
        raise CliError(f"cannot wrap this model{size}: {err}", EXIT_BAD_INPUT) from None
    except ConfigError as err:
        raise CliError(str(err), EXIT_USAGE) from None


# ------------------------------------------------------------------------------------ output


def emit_json(payload: Any) -> None:
    """Print strict JSON to stdout (the only thing a ``--json`` command prints there)."""
    json.dump(payload, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


def status(message: str, args: argparse.Namespace | None = None) -> None:
    """A progress line on stderr (silenced by ``--no-progress``)."""
    if args is not None and getattr(args, "no_progress", False):
        return
    print(message, file=sys.stderr, flush=True)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain aligned text table.

    Example:
        >>> print(table([[1, "a"]], ["n", "s"]))
        n  s
        -  -
        1  a
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)
