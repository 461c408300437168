"""``earlyexit serve``: answer HTTP requests with early exits, learning them from the traffic."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from .common import (
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_MISSING_FILE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    add_model_source_arguments,
    add_output_arguments,
    build_model,
    emit_json,
    exit_codes_text,
    parse_input_size,
    positive_int,
)
from .serving import _unit_interval

NAME = "serve"
HELP = "serve a model over HTTP with early exits, learning them from the traffic it answers"
DESCRIPTION = (
    "Builds MODEL (timm:NAME or torchvision:NAME; --weights, --pretrained, --num-classes and "
    "--input-size as for `earlyexit run`), wraps it with early exits (or starts from heads saved "
    "with eem.save: --heads) and serves it on HOST:PORT. POST /predict takes one PNG or JPEG "
    "image (decoded and preprocessed as `earlyexit run` does) or a preprocessed float32 batch "
    "[B, C, H, W] as .npy (Content-Type application/x-npy) and answers {predictions: [{label, "
    "probability, exit, accepted}], heads_version, num_exits}. Concurrent requests are batched "
    "(--max-batch, --max-wait-ms) and served on one thread; the online learner trains and "
    "calibrates on its own thread and publishes heads and thresholds together between batches. "
    "GET /healthz, /stats (the learner's stats), /metrics (Prometheus). POST /save and "
    "/calibrate need Authorization: Bearer TOKEN when --token is set; a host other than "
    "loopback needs --token. On SIGTERM the server finishes the requests in flight, saves the "
    "heads and thresholds to --save-on-exit (atomically; load them with earlyexit.load) and "
    "exits 0. --learner-state PATH saves the whole learner there on exit (evidence, replay, "
    "counters) and resumes it when the file exists, so a restarted server keeps its gates open "
    "instead of proving them again. --frozen serves --heads as they are (no learning, no audits); --plain serves the "
    "base model alone through the same server, for comparison. "
    "Needs pip install 'earlyexit[serve]'."
)
EPILOG = f"""examples:
  earlyexit serve --model timm:resnet50 --weights resnet50.pth --save-on-exit heads.safetensors
  earlyexit serve --model timm:resnet18 --num-classes 10 --input-size 64 --port 0
  earlyexit serve --model timm:resnet50 --weights resnet50.pth --learner-state learner.safetensors
  earlyexit serve --model torchvision:resnet18 --pretrained --heads heads.safetensors --frozen
  earlyexit serve --model torchvision:resnet18 --pretrained --plain
  curl -s -X POST --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8000/predict

exit codes:
{exit_codes_text()}"""

#: The environment variable that may hold the token instead of --token.
TOKEN_VARIABLE = "EARLYEXIT_SERVE_TOKEN"

#: The packages of the serve extra, checked before a model is built.
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


#: Default cap on the server's learning work, as a share of serving wall-clock: the learner's
#: thread shares the cores with serving, so an uncapped sample schedule would slow every answer.
SERVER_LEARN_BUDGET = 0.12


def _budget(text: str) -> float | None:
    """``--learn-budget``: a share > 0, or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"expected a share of serving time > 0 (e.g. 0.12) or 'none', got {text!r}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_arguments(parser)
    parser.add_argument(
        "--input-size",
        type=parse_input_size,
        metavar="SIZE",
        help="H, HxW or CxHxW (default: the model's own)",
    )
    parser.add_argument(
        "--heads",
        metavar="PATH",
        help="start from heads and thresholds saved with eem.save (default: new heads, gates closed)",
    )
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other needs --token)",
    )
    net.add_argument(
        "--port", type=_port, default=8000, help="port (default 8000; 0: any free port)"
    )
    net.add_argument(
        "--token",
        metavar="TOKEN",
        default=os.environ.get(TOKEN_VARIABLE) or None,
        help="POST /save and /calibrate then need Authorization: Bearer TOKEN (default: "
        f"${TOKEN_VARIABLE}, which other users cannot read in the process list)",
    )
    net.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=8 * 1024 * 1024,
        metavar="N",
        help="larger request bodies get a 413 (default 8 MiB)",
    )
    serving = parser.add_argument_group("serving and learning")
    serving.add_argument(
        "--save-on-exit",
        metavar="PATH",
        help="save the heads and thresholds here on SIGTERM/Ctrl-C (and for POST /save)",
    )
    serving.add_argument(
        "--learner-state",
        metavar="PATH",
        help="resume the learner saved in PATH when the file exists (its heads, thresholds, "
        "evidence, replay and counters: the gates stay open across a restart; --heads and "
        "--head then apply only to a first start) and save the whole learner there on "
        "SIGTERM/Ctrl-C, atomically (up to the learner's memory cap, 256 MiB by default; "
        "earlyexit.load reads its heads). Not with --frozen, --plain, --ray or --head auto",
    )
    serving.add_argument(
        "--target-agreement",
        type=_unit_interval,
        default=0.99,
        metavar="P",
        help="agreement with the full model that exiting samples must keep (default 0.99)",
    )
    serving.add_argument(
        "--learn-budget",
        type=_budget,
        default=SERVER_LEARN_BUDGET,
        metavar="SHARE|none",
        help="cap the learner's background work (its thread's CPU time) at this share of "
        "serving wall-clock, earned "
        f"per batch (default {SERVER_LEARN_BUDGET}: a server is latency-critical; more while "
        "every gate is closed, see DistillConfig.train_time_budget); 'none' learns on the "
        "sample schedule alone, as earlyexit run does (more steps, reproducible counts)",
    )
    serving.add_argument(
        "--max-batch",
        type=positive_int,
        default=32,
        metavar="N",
        help="most samples served together (default 32)",
    )
    serving.add_argument(
        "--max-wait-ms",
        type=_non_negative,
        default=0.0,
        metavar="MS",
        help="longest a request waits for others to join its batch (default 0: served as soon "
        "as the serving thread is free; requests arriving meanwhile are batched together)",
    )
    serving.add_argument(
        "--max-queued-requests",
        type=positive_int,
        default=256,
        metavar="N",
        help="requests waiting to be served beyond which new ones get a 503 at once "
        "(back-pressure; with --ray, per replica; default 256)",
    )
    serving.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads for torch (default: torch's); use 1 when another job shares the cores",
    )
    serving.add_argument(
        "--head",
        metavar="KIND|auto",
        help="head kind of new heads (default conv, as `earlyexit run`), or 'auto': the full "
        "model answers the first --choice-samples requests while linear and conv heads learn "
        "at every candidate place, then each place keeps the kind that saves the most MACs at "
        "the target (or none) and the learner carries on with them (not with --heads or --ray)",
    )
    serving.add_argument(
        "--choice-samples",
        type=positive_int,
        default=2048,
        metavar="N",
        help="samples --head auto watches before choosing (default 2048)",
    )
    serving.add_argument(
        "--frozen",
        action="store_true",
        help="serve the --heads as they are: no learning, no audits, no recalibration (the "
        "policy of a finished learner at the cost of the wrapped model alone)",
    )
    serving.add_argument(
        "--plain",
        action="store_true",
        help="serve the base model alone (no exits, no learner), through the same server",
    )
    scale = parser.add_argument_group(
        "scale-out on Ray Serve (pip install 'earlyexit[ray]')",
        "N replicas answer through Ray's HTTP proxy (same endpoints); one learner learns from "
        "the features every replica sends and releases heads that each installs between batches",
    )
    scale.add_argument(
        "--ray", action="store_true", help="serve with Ray Serve replicas instead of one process"
    )
    scale.add_argument(
        "--replicas",
        type=positive_int,
        default=2,
        metavar="N",
        help="serving replicas with --ray (default 2; each reserves one Ray CPU)",
    )
    scale.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join this Ray cluster (default: start a local one with every CPU of this machine)",
    )
    add_output_arguments(parser)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from .._optional import require_extra_packages
    from ..errors import ConfigError

    # Before minutes of model building: the HTTP packages, and the host rule.
    require_extra_packages(SERVE_MODULES, "earlyexit serve", "serve")
    from ..server import (
        ChoosingBackend,
        FrozenBackend,
        LearnerBackend,
        PlainBackend,
        ServerSettings,
        bind_socket,
        check_host,
        create_app,
        run_server,
    )

    try:
        check_host(args.host, args.token)
        settings = ServerSettings(
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_queued_requests=args.max_queued_requests,
            max_body_bytes=args.max_body_bytes,
            token=args.token,
            save_on_exit=args.save_on_exit,
            learner_state=args.learner_state,
        )
    except ConfigError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    if args.frozen and (args.plain or args.ray or not args.heads):
        raise CliError(
            "--frozen serves saved heads as they are, in this process: it needs --heads PATH "
            "and takes neither --plain nor --ray",
            EXIT_USAGE,
        )
    if args.plain and args.heads:
        raise CliError("--plain serves the base model alone: it takes no --heads", EXIT_USAGE)
    _check_head(args)
    _check_learner_state(args)
    if args.ray:
        if args.plain:
            raise CliError(
                "--ray serves early exits with a learner: it takes no --plain", EXIT_USAGE
            )
        require_extra_packages(("ray",), "earlyexit serve --ray", "ray")
    if args.heads and not Path(args.heads).is_file():
        raise CliError(f"heads file not found: {args.heads}", EXIT_MISSING_FILE)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    model, label = build_model(
        args.model, num_classes=args.num_classes, weights=args.weights, pretrained=args.pretrained
    )
    transform, input_size = _preprocessing(model, label, args.input_size)
    if args.ray:
        from .serve_ray import serve_on_ray

        eem = _wrapped(model, args, input_size)
        return serve_on_ray(args, eem, transform, _distill_config(args), label)
    if args.plain:
        _check_plain(model, input_size)
        backend: Any = PlainBackend(model, input_size)
    elif args.frozen:
        backend = FrozenBackend(_wrapped(model, args, input_size))
    elif args.head == "auto":
        backend = ChoosingBackend(_chooser(model, args, input_size), _distill_config(args))
    else:
        backend = LearnerBackend(_learner(model, args, input_size))
    app = create_app(backend, transform, settings)
    try:
        sock = bind_socket(args.host, args.port, token=args.token)
    except OSError as err:
        backend.close()
        raise CliError(f"cannot listen on {args.host}:{args.port}: {err}", EXIT_BAD_INPUT) from None
    started = run_server(
        app, sock, on_ready=lambda url: print(f"serving on {url}", file=sys.stderr, flush=True)
    )
    state = app.state.server
    if not started:
        backend.close()
        raise CliError("the server did not start (see the messages above)", EXIT_ERROR)
    summary = {
        **state.stats(),
        "saved": state.saved_to,
        "learner_saved": state.learner_saved_to,
        "model": label,
    }
    if args.json:
        emit_json(summary)
    else:
        print(
            f"served {summary['requests']} requests in {summary['batches']} batches; "
            f"heads version {summary['heads_version']}"
            + (f"; saved heads and thresholds to {state.saved_to}" if state.saved_to else "")
            + (f"; saved the learner to {state.learner_saved_to}" if state.learner_saved_to else "")
        )
    return EXIT_ERROR if state.shutdown_error else EXIT_OK


def _check_head(args: argparse.Namespace) -> None:
    """``--head``: a known kind or ``auto``, for new heads only."""
    from ..heads import head_kinds

    if args.head is None:
        return
    if args.plain or args.heads:
        given = "--plain" if args.plain else "--heads"
        raise CliError(
            f"--head sets the kind of new heads: {given} takes none (saved heads keep theirs)",
            EXIT_USAGE,
        )
    known = (*head_kinds(), "auto")
    if args.head not in known:
        raise CliError(
            f"unknown --head {args.head!r}; expected one of: {', '.join(known)}", EXIT_USAGE
        )
    if args.head == "auto" and args.ray:
        raise CliError(
            "--head auto is not available with --ray (every replica would have to switch to the "
            "chosen heads at once): choose them first with `earlyexit run --head auto --save "
            "heads.safetensors`, then serve --ray --heads heads.safetensors",
            EXIT_USAGE,
        )


def _preprocessing(model: Any, label: str, input_size: tuple[int, int, int] | None) -> Any:
    """The model's preprocessing (as ``earlyexit run`` builds it) and the size it produces."""
    from PIL import Image

    from ..data import model_transform

    source, name = label.split(":", 1)
    transform = model_transform(model, source, name, input_size=input_size)
    probe = transform(Image.new("RGB", (256, 256)))
    return transform, tuple(int(v) for v in probe.shape)


def _check_learner_state(args: argparse.Namespace) -> None:
    """``--learner-state``: only where a learner serves, in a folder that exists."""
    path = args.learner_state
    if path is None:
        return
    without_learner = [
        flag
        for flag, on in (
            ("--frozen", args.frozen),
            ("--plain", args.plain),
            ("--ray", args.ray),
            ("--head auto", args.head == "auto"),
        )
        if on
    ]
    if without_learner:
        raise CliError(
            f"--learner-state saves and resumes the learner of this process: "
            f"{without_learner[0]} takes none (use --save-on-exit for the heads and thresholds)",
            EXIT_USAGE,
        )
    if Path(path).is_dir() or not Path(path).parent.is_dir():
        raise CliError(
            f"--learner-state needs a file path in a folder that exists, got {path}",
            EXIT_MISSING_FILE,
        )


def _learner(model: Any, args: argparse.Namespace, input_size: tuple[int, int, int]) -> Any:
    """The learner: resumed from ``--learner-state`` when that file exists, else a new one on
    the wrapped model (new heads as ``earlyexit run`` wraps, or ``--heads``)."""
    from ..distill import OnlineDistiller

    if args.learner_state is not None and Path(args.learner_state).is_file():
        return _resumed_learner(model, args, input_size)
    return OnlineDistiller(_wrapped(model, args, input_size), _distill_config(args))


def _resumed_learner(model: Any, args: argparse.Namespace, input_size: tuple[int, int, int]) -> Any:
    """The learner saved in ``--learner-state``, learning in the background at ``--learn-budget``
    (the pace may change across a restart; the target may not: its evidence proves that one)."""
    from ..distill import OnlineDistiller
    from ..errors import CheckpointError, ConfigError, UnsupportedModelError

    path = args.learner_state
    try:
        learner = OnlineDistiller.load(
            model, path, background=True, train_time_budget=args.learn_budget
        )
    except (CheckpointError, UnsupportedModelError) as err:
        raise CliError(f"cannot resume the learner in {path}: {err}", EXIT_BAD_INPUT) from None
    except ConfigError as err:
        raise CliError(f"cannot resume the learner in {path}: {err}", EXIT_USAGE) from None
    saved_target = learner.config.target_agreement
    problem = None
    if saved_target != args.target_agreement:
        problem = (
            f"the learner in {path} proves agreement {saved_target}; pass --target-agreement "
            f"{saved_target}, or start a new learner with another --learner-state path"
        )
    elif tuple(learner.eem.input_size) != input_size:
        problem = (
            f"the preprocessing makes {input_size} images but the learner in {path} takes "
            f"{tuple(learner.eem.input_size)}: pass --input-size to set both"
        )
    if problem is not None:
        learner.close()
        learner.eem.remove()
        raise CliError(problem, EXIT_BAD_INPUT)
    print(
        f"resumed the learner in {path}: {learner.stats()['samples']} samples seen, heads "
        f"version {learner.heads_version}",
        file=sys.stderr,
        flush=True,
    )
    return learner


def _wrapped(model: Any, args: argparse.Namespace, input_size: tuple[int, int, int]) -> Any:
    """The wrapped model: new heads as ``earlyexit run`` wraps, or those saved in ``--heads``."""
    from ..errors import CheckpointError, ConfigError, UnsupportedModelError
    from ..loading import load

    defaults = _options(args)  # the exits, heads and gate `earlyexit run` uses
    try:
        # New heads are sized for what the preprocessing makes.
        eem = load(model, args.heads) if args.heads else defaults.wrap(model, input_size)
    except (CheckpointError, UnsupportedModelError) as err:
        raise CliError(str(err), EXIT_BAD_INPUT) from None
    except ConfigError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    if tuple(eem.input_size) != input_size:
        raise CliError(
            f"the preprocessing makes {input_size} images but the wrapped model takes "
            f"{tuple(eem.input_size)}: pass --input-size to set both",
            EXIT_BAD_INPUT,
        )
    return eem


def _options(args: argparse.Namespace) -> Any:
    """``earlyexit run``'s exits, head and gate, with ``--head`` and ``--choice-samples``."""
    from ..evaluation.pipeline import PipelineOptions

    head = getattr(args, "head", None)
    return PipelineOptions(
        **({} if head is None else {"head": head}),
        choice_samples=getattr(args, "choice_samples", 2048),
    )


def _chooser(model: Any, args: argparse.Namespace, input_size: tuple[int, int, int]) -> Any:
    """The :class:`~earlyexit.HeadChooser` of ``--head auto``, learning as the server's learner
    will (the same content split, so what it holds out stays held out)."""
    from ..errors import ConfigError, UnsupportedModelError

    try:
        return _options(args).chooser(model, input_size, _distill_config(args))
    except UnsupportedModelError as err:
        raise CliError(str(err), EXIT_BAD_INPUT) from None
    except ConfigError as err:
        raise CliError(str(err), EXIT_USAGE) from None


def _distill_config(args: argparse.Namespace) -> Any:
    """The learner's config: ``earlyexit run``'s choices, learning in the background."""
    from ..distill import DistillConfig
    from ..evaluation.pipeline import PipelineOptions

    defaults = PipelineOptions()
    return DistillConfig(
        target_agreement=args.target_agreement,
        confidence=defaults.confidence,
        seed=defaults.seed,
        gate="learned" if defaults.gate == "learned" else "fixed",
        background=True,  # training and calibration never hold up a request
        train_time_budget=args.learn_budget,
    )


def _check_plain(model: Any, input_size: tuple[int, int, int]) -> None:
    """One forward pass at the served size: a model that cannot take it fails now, not per request."""
    import torch

    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, dtype=dtype))
    except RuntimeError as err:
        raise CliError(
            f"the model cannot take {input_size} inputs ({err}); pass --input-size", EXIT_BAD_INPUT
        ) from None
