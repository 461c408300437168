"""``wrap``: from a classifier to an :class:`EarlyExitModel`.

Wrapping runs the model a couple of times on random input (never touching its weights, buffers or
train/eval flags) to learn what no attribute says reliably: the execution order of the candidate
exits, their feature shapes, the MACs spent before each, the number of classes, and whether the
chosen exit modules really are stage boundaries (dropping rows there must give exactly the
remaining rows' logits).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbones import BackboneAdapter, FeatureLayout, find_adapter
from .costs.macs import MacCounter
from .errors import ConfigError, UnsupportedModelError
from .gates import Gate, make_gate
from .heads import HeadFactory, HeadSpec, build_head, head_factory
from .model import EarlyExitModel, ExitPoint
from .supervisors import Supervisor, make_supervisor

DEFAULT_NUM_EXITS = 4
#: Share of the base model's MACs a default head may spend (the cap tested is 2%).
DEFAULT_HEAD_BUDGET = 0.01
#: Auto placement ignores candidates this deep: an exit there saves almost nothing.
MAX_AUTO_FRACTION = 0.9


@dataclass
class _ProbedModule:
    name: str
    order: int
    feature_shape: tuple[int, ...]
    macs_through: int
    calls: int


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily eval() so probing never updates BatchNorm statistics; restores every flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _probe_input(model: nn.Module, batch: int, input_size: tuple[int, int, int]) -> Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=generator).to(device=device, dtype=dtype)


def _probe(
    model: nn.Module, names: Sequence[str], input_size: tuple[int, int, int]
) -> tuple[dict[str, _ProbedModule], int, int, dict[str, Tensor]]:
    """One forward pass of one sample: order, shapes and cumulative MACs at each named module."""
    probed: dict[str, _ProbedModule] = {}
    features: dict[str, Tensor] = {}
    handles = []
    counter = MacCounter()

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if name in probed:
                probed[name].calls += 1
                return
            shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else ()
            probed[name] = _ProbedModule(name, len(probed), shape, counter.total, 1)
            if isinstance(output, Tensor):
                features[name] = output.detach()

        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
    x = _probe_input(model, 1, input_size)
    try:
        with _eval_mode(model), torch.no_grad(), counter:
            out = model(x)
    except Exception as err:
        raise UnsupportedModelError(
            f"running the model on a random {tuple(x.shape)} input failed ({type(err).__name__}: {err}). "
            "Pass input_size=(C, H, W) if the model expects another size."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise UnsupportedModelError(
            f"the model returned {type(out).__name__} {getattr(out, 'shape', '')}; earlyexit wraps "
            "classifiers returning [B, num_classes] logits"
        )
    return probed, counter.total, out.shape[1], features


def _resolve_names(
    model: nn.Module, exits: Sequence[str | int], candidates: Sequence[str]
) -> list[str]:
    modules = dict(model.named_modules())
    names: list[str] = []
    for item in exits:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ConfigError(f"exits must be module names or candidate indices, got {item!r}")
        if isinstance(item, int):
            if not candidates:
                raise ConfigError(
                    "exits given by index, but this model has no known candidate exits; use module names"
                )
            if not -len(candidates) <= item < len(candidates):
                raise ConfigError(
                    f"exit index {item} is out of range: this model has {len(candidates)} candidate "
                    f"exits (0..{len(candidates) - 1}); see earlyexit.exit_candidates(model)"
                )
            name = candidates[item]
        else:
            if item not in modules or item == "":
                close = difflib.get_close_matches(item, list(modules), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"the model has no module named {item!r}{hint}")
            name = item
        if name in names:
            raise ConfigError(f"exit {name!r} is given twice; each exit must be a different module")
        names.append(name)
    if not names:
        raise ConfigError("exits is empty; give at least one exit, or exits='auto'")
    return names


def _auto_select(
    candidates: Sequence[str], probed: dict[str, _ProbedModule], total: int, count: int
) -> list[str]:
    """Pick ``count`` candidates whose cumulative MACs are spread evenly over the backbone."""
    eligible = [
        n
        for n in candidates
        if n in probed and 0 < probed[n].macs_through <= MAX_AUTO_FRACTION * total
    ]
    eligible.sort(key=lambda n: probed[n].order)
    # Exits closer than half a spacing add a head's cost for little new information: skip them
    # (coarse families such as DenseNet then get fewer, better spread exits).
    min_gap = 0.5 / (count + 1) * total
    chosen: list[str] = []
    for k in range(count):
        target = (k + 1) / (count + 1) * total
        free = [
            n
            for n in eligible
            if all(abs(probed[n].macs_through - probed[c].macs_through) >= min_gap for c in chosen)
        ]
        if free:
            chosen.append(min(free, key=lambda n: abs(probed[n].macs_through - target)))
    return sorted(chosen, key=lambda n: probed[n].order)


def _check_boundaries(
    model: nn.Module, names: Sequence[str], input_size: tuple[int, int, int]
) -> None:
    """Dropping one row at each exit must leave the other rows' logits unchanged."""
    batch = len(names) + 1
    x = _probe_input(model, batch, input_size)
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: object) -> Tensor:
            if not isinstance(output, Tensor):
                raise UnsupportedModelError(
                    f"module {name!r} returns {type(output).__name__}, not a tensor: it cannot be an exit"
                )
            return output[1:]

        return hook

    with _eval_mode(model), torch.no_grad():
        reference = model(x)
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        try:
            shrunk = model(x)
        except Exception as err:
            raise UnsupportedModelError(
                f"the model fails when rows are dropped at exits {list(names)} ({type(err).__name__}: {err}): "
                "some layer after an exit uses more than that module's output (a skip connection or a "
                "batch size taken earlier). Choose stage-boundary modules, or register an adapter."
            ) from err
        finally:
            for handle in handles:
                handle.remove()
    expected = reference[len(names) :]
    scale = float(reference.abs().max().clamp_min(1.0))
    if shrunk.shape != expected.shape or not torch.allclose(
        shrunk.float(), expected.float(), rtol=1e-3, atol=1e-3 * scale
    ):
        raise UnsupportedModelError(
            f"dropping rows at exits {list(names)} changes the remaining rows' logits: some layer after "
            "an exit sees more than that module's output (a skip connection across it, or a batch "
            "statistic). Choose stage-boundary modules (see earlyexit.exit_candidates(model))."
        )


def _generic_adapter() -> BackboneAdapter:
    return BackboneAdapter(
        family="generic", matches=lambda m: True, is_exit_candidate=lambda n, m: False
    )


def _layout_for(
    adapter: BackboneAdapter, model: nn.Module, name: str, shape: tuple[int, ...]
) -> FeatureLayout:
    layout = adapter.layout(model, name)
    if len(shape) == 2 and layout.kind != "tokens":  # [N, C] tokens, whatever the family says
        return FeatureLayout("tokens", prefix_tokens=layout.prefix_tokens, token_pool="avg")
    if len(shape) not in (1, 2, 3):
        raise UnsupportedModelError(
            f"exit {name!r} has a feature of shape {shape}; expected [C, H, W], [H, W, C] or [N, C]"
        )
    return layout


def _head_list(head: object, factories: bool = False) -> tuple[str | HeadFactory, ...] | None:
    """The entries of a per-exit list of heads, each checked (names against the registry);
    ``None`` when ``head`` is one name or one callable for every exit (checked too). A list holds
    names only, unless ``factories`` (loading puts a custom head's factory at its exits)."""
    if isinstance(head, str) or callable(head) or not isinstance(head, Sequence):
        head_factory(head)  # type: ignore[arg-type]  # an unknown name fails before probing
        return None
    entries = tuple(head)
    if not entries:
        raise ConfigError(
            "head is an empty list: pass one head name per exit (see earlyexit.head_kinds()), "
            "or one name for every exit, e.g. head='linear'"
        )
    for i, entry in enumerate(entries):
        if not isinstance(entry, str) and not (factories and callable(entry)):
            raise ConfigError(
                f"head[{i}] is {entry!r}: a list of heads holds registered names only (see "
                "earlyexit.head_kinds()); pass a callable factory alone, head=factory, or "
                "register it with earlyexit.register_head(name, factory) and list its name"
            )
        head_factory(entry)
    return entries


def _kind_name(head: str | HeadFactory) -> str:
    """What ``head_kinds`` records for a head: its registered name, or "custom" for a callable."""
    return head if isinstance(head, str) else "custom"


def _match_kinds(
    kinds: tuple[str | HeadFactory, ...] | None, names: Sequence[str], requested: Sequence[str]
) -> None:
    """A per-exit list of heads must have one name per exit; with explicit exits listed in another
    order than the model runs them, which kind goes where would be a guess, so it is refused."""
    if kinds is None:
        return
    if len(kinds) != len(names):
        raise ConfigError(
            f"head lists {len(kinds)} head kind(s) for {len(names)} exit(s) "
            f"({', '.join(names)}): pass {len(names)} head name(s), one per exit in the order the "
            "model runs them, or one name for every exit"
        )
    if (
        requested
        and list(requested) != list(names)
        and len({k if isinstance(k, str) else id(k) for k in kinds}) > 1
    ):
        raise ConfigError(
            f"exits are listed as {list(requested)} but the model runs them as {list(names)}: "
            "with one head kind per exit, list the exits in that order so each kind goes where "
            "you mean it"
        )


def exit_candidates(model: nn.Module) -> tuple[str, ...]:
    """Module names where exits may go in ``model`` (index them with ``wrap(exits=[...])``).

    Example:
        >>> import timm, earlyexit as ee
        >>> ee.exit_candidates(timm.create_model("resnet18"))[:2]
        ('layer1.0', 'layer1.1')
    """
    return tuple(find_adapter(model).candidates(model))


def wrap(
    model: nn.Module,
    exits: str | Sequence[str | int] = "auto",
    head: str | HeadFactory | Sequence[str] = "linear",
    gate: str | Gate = "max_softmax",
    supervisor: str | Supervisor | None = None,
    *,
    num_exits: int = DEFAULT_NUM_EXITS,
    input_size: tuple[int, int, int] | None = None,
    head_budget: float = DEFAULT_HEAD_BUDGET,
    validate: bool = True,
) -> EarlyExitModel:
    """Attach exit heads to a timm or torchvision classifier, without modifying it.

    Args:
        model: the classifier (its weights, buffers and train/eval mode are never changed); the
            original module, not ``torch.compile(model)``.
        exits: ``"auto"`` (``num_exits`` exits spread evenly by MACs over the backbone), or a list
            of module names and/or indices into :func:`exit_candidates`.
        head: ``"linear"``, ``"mlp"``, ``"conv"`` (see :mod:`earlyexit.heads`), another registered
            name, or a callable ``HeadSpec -> nn.Module``, for every exit; or a list of registered
            names, one per exit, matched to the exits in the order the model runs them (the order
            of ``eem.exits``). With explicit ``exits`` and differing kinds, list the exits in that
            order too; with ``"auto"``, as many names as exits are placed (``num_exits``, or fewer
            on models with few stage boundaries: the error says how many).
        gate: how a head's confidence is scored: a name from :func:`earlyexit.gates.gate_names` or a
            :class:`~earlyexit.gates.Gate`.
        supervisor: a score name or :class:`~earlyexit.supervisors.Supervisor` for the full model's
            output, or ``None``.
        num_exits: how many exits ``"auto"`` places.
        input_size: ``(C, H, W)`` the model expects, when the family's default is wrong.
        head_budget: MACs per head as a share of the base model's (sizes mlp/conv heads).
        validate: check, by running the model once, that dropping rows at the exits leaves the other
            rows' logits unchanged (skipped for a model in training mode).

    Returns:
        An :class:`EarlyExitModel` with every gate closed: it returns exactly what ``model`` returns
        until thresholds are set or learned.

    Example:
        >>> import timm, earlyexit as ee
        >>> eem = ee.wrap(timm.create_model("resnet18").eval(), exits="auto", head="mlp")
        >>> [e.name for e in eem.exits]
        ['layer1.1', 'layer2.1', 'layer3.0', 'layer3.1']
        >>> eem = ee.wrap(timm.create_model("resnet18").eval(), head=["linear", "linear", "conv", "conv"])
        >>> eem.head_kinds, eem.head_kind
        (('linear', 'linear', 'conv', 'conv'), 'mixed')
    """
    return _wrap(
        model,
        exits,
        head,
        gate,
        supervisor,
        num_exits=num_exits,
        input_size=input_size,
        head_budget=head_budget,
        validate=validate,
    )


def _wrap(
    model: nn.Module,
    exits: str | Sequence[str | int],
    head: str | HeadFactory | Sequence[str | HeadFactory],
    gate: str | Gate,
    supervisor: str | Supervisor | None,
    *,
    num_exits: int = DEFAULT_NUM_EXITS,
    input_size: tuple[int, int, int] | None = None,
    head_budget: float = DEFAULT_HEAD_BUDGET,
    validate: bool = True,
    factories_in_list: bool = False,
) -> EarlyExitModel:
    """:func:`wrap`; with ``factories_in_list``, a list of heads may hold factories beside names
    (loading rebuilds a file's custom heads so)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"wrap expects a torch.nn.Module classifier, got {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
        raise UnsupportedModelError(
            "wrap got a torch.compile'd module: wrap the original model instead, ee.wrap(m) "
            "rather than ee.wrap(torch.compile(m)) (the original is also at compiled._orig_mod)"
        )
    if not isinstance(exits, str | Sequence):
        hint = (
            f" (for {exits} exits placed for you, use num_exits={exits})"
            if isinstance(exits, int) and not isinstance(exits, bool)
            else ""
        )
        raise ConfigError(
            f"exits must be 'auto' or a list of module names/indices, got {exits!r}{hint}"
        )
    try:
        adapter = find_adapter(model)
    except UnsupportedModelError:
        if isinstance(exits, str) or not all(isinstance(e, str) for e in exits):
            raise
        adapter = _generic_adapter()  # explicit module names: usable once checked below
    if input_size is None:
        input_size = adapter.input_size(model)
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) != 3 or min(input_size) < 1:
        raise ConfigError(f"input_size must be (C, H, W) with positive entries, got {input_size}")
    if not 0 < head_budget <= 1:
        raise ConfigError(f"head_budget must be in (0, 1], got {head_budget}")
    kinds = _head_list(head, factories_in_list)
    gate_obj = make_gate(gate)
    supervisor_obj = make_supervisor(supervisor)
    candidates = adapter.candidates(model)

    if isinstance(exits, str):
        if exits != "auto":
            raise ConfigError(
                f"exits must be 'auto' or a list of module names/indices, got {exits!r}"
            )
        if num_exits < 1:
            raise ConfigError(f"num_exits must be at least 1, got {num_exits}")
        if not candidates:
            raise UnsupportedModelError(
                f"the {adapter.family} adapter found no candidate exits in this model"
            )
        requested: list[str] = []
    else:
        requested = _resolve_names(model, list(exits), candidates)

    probed, base_macs, num_classes, features = _probe(
        model, sorted(set(candidates) | set(requested)), input_size
    )
    if requested:
        for name in requested:
            if name not in probed:
                raise ConfigError(
                    f"module {name!r} does not run in the model's forward pass; it cannot be an exit"
                )
            if probed[name].calls > 1:
                raise ConfigError(
                    f"module {name!r} runs {probed[name].calls} times per forward pass; it cannot be an exit"
                )
        names = sorted(requested, key=lambda n: probed[n].order)
    else:
        names = _auto_select(candidates, probed, base_macs, num_exits)
        if not names:
            raise UnsupportedModelError("no candidate exit of this model lies inside the backbone")
    _match_kinds(kinds, names, requested)
    if validate and not model.training:
        _check_boundaries(model, names, input_size)

    layouts, heads, head_macs, points = [], [], [], []
    param = next(model.parameters(), None)
    spent = 0
    per_exit = kinds if kinds is not None else (head,) * len(names)
    for name, head_i in zip(names, per_exit, strict=True):
        shape = probed[name].feature_shape
        layout = _layout_for(adapter, model, name, shape)
        spec = HeadSpec(
            channels=layout.channels(shape),
            num_classes=num_classes,
            layout=layout,
            feature_shape=shape,
            mac_budget=int(head_budget * base_macs),
        )
        module = build_head(head_i, spec)
        if param is not None:
            module = module.to(device=param.device, dtype=param.dtype)
        with torch.no_grad(), MacCounter() as counter:
            logits = module(features[name])
        if tuple(logits.shape) != (1, num_classes):
            raise ConfigError(
                f"the head at {name!r} returned shape {tuple(logits.shape)}, expected (B, {num_classes})"
            )
        spent += counter.total
        index = candidates.index(name) if name in candidates else -1
        layouts.append(layout)
        heads.append(module)
        head_macs.append(counter.total)
        points.append(ExitPoint(name, index, spec.channels, probed[name].macs_through + spent))

    return EarlyExitModel(
        model,
        family=adapter.family,
        exits=points,
        layouts=layouts,
        heads=heads,
        head_kind=tuple(_kind_name(h) for h in per_exit),
        head_budget=head_budget,
        head_macs=head_macs,
        backbone_macs=[probed[n].macs_through for n in names],
        base_macs=base_macs,
        gate=gate_obj,
        supervisor=supervisor_obj,
        input_size=input_size,
        fixed_input_size=adapter.fixed_input_size(model),
        num_classes=num_classes,
        candidates=candidates,
    )
