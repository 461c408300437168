"""What the wrapper needs to know about a backbone family, and the registry of families.

An adapter answers three questions about a classifier without running it:

* which modules are *stage boundaries*: modules whose output is the only thing the rest of the
  network sees, so a forward hook there may hand back fewer rows and every later layer runs on
  fewer samples (the candidates for exits);
* how a feature at such a boundary is laid out (NCHW maps, NHWC maps, or tokens with prefix tokens),
  so a head can pool it the way the model's own head does;
* the input size the model was built for, and whether it only accepts that size.

Built-in adapters cover the timm and torchvision families named in the README; user code adds a
family with :func:`register_adapter`. The registry follows the library's one convention
(:mod:`earlyexit._registry`): a registered family is not replaced without ``overwrite=True``, and
every operation is thread-safe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .._registry import Registry
from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class FeatureLayout:
    """How the per-sample feature at an exit is laid out.

    ``kind`` is ``"nchw"`` (conv maps), ``"nhwc"`` (conv maps, channels last, e.g. Swin) or
    ``"tokens"`` (``[B, N, C]``). For tokens, ``prefix_tokens`` leading tokens are class/distillation
    tokens and ``token_pool`` says how the model's own head pools them: ``"cls"`` (first token) or
    ``"avg"`` (mean of the non-prefix tokens).

    Example:
        >>> FeatureLayout("tokens", prefix_tokens=1, token_pool="cls")
        FeatureLayout(kind='tokens', prefix_tokens=1, token_pool='cls')
    """

    kind: str = "nchw"
    prefix_tokens: int = 0
    token_pool: str = "avg"

    def __post_init__(self) -> None:
        if self.kind not in ("nchw", "nhwc", "tokens"):
            raise ValueError(
                f"FeatureLayout.kind must be 'nchw', 'nhwc' or 'tokens', got {self.kind!r}"
            )
        if self.token_pool not in ("cls", "avg"):
            raise ValueError(
                f"FeatureLayout.token_pool must be 'cls' or 'avg', got {self.token_pool!r}"
            )
        if self.prefix_tokens < 0:
            raise ValueError(f"FeatureLayout.prefix_tokens must be >= 0, got {self.prefix_tokens}")

    def channels(self, feature_shape: tuple[int, ...]) -> int:
        """Channel count of a per-sample feature of this layout (shape without the batch dim)."""
        return feature_shape[0] if self.kind == "nchw" else feature_shape[-1]


def _default_layout(model: nn.Module, name: str) -> FeatureLayout:
    return FeatureLayout("nchw")


def _default_input_size(model: nn.Module) -> tuple[int, int, int]:
    return (3, 224, 224)


def _never_fixed(model: nn.Module) -> bool:
    return False


@dataclass(frozen=True)
class BackboneAdapter:
    """Describes one family of classifiers (see the module docstring).

    Args:
        family: a short name shown in messages and reports, e.g. ``"timm.resnet"``.
        matches: ``matches(model)`` is True when this adapter handles ``model``.
        is_exit_candidate: ``is_exit_candidate(name, module)`` is True for the stage-boundary
            modules where exits may go (names as in ``model.named_modules()``). Candidates are
            ordered by execution; every chosen exit is also checked by running the model once.
        layout: ``layout(model, name)`` gives the :class:`FeatureLayout` of the output of module
            ``name``. Token outputs ``[B, N, C]`` are recognised by their rank whatever this says.
        input_size: ``input_size(model)`` gives ``(C, H, W)`` the model was built for.
        fixed_input_size: ``fixed_input_size(model)`` is True when the model accepts only that size.

    Example:
        >>> import earlyexit as ee
        >>> adapter = ee.BackboneAdapter(
        ...     family="mylib.tinynet",
        ...     matches=lambda m: type(m).__name__ == "TinyNet",
        ...     is_exit_candidate=lambda name, mod: name.startswith("blocks.") and name.count(".") == 1,
        ... )
        >>> ee.register_adapter(adapter)  # doctest: +SKIP
    """

    family: str
    matches: Callable[[nn.Module], bool]
    is_exit_candidate: Callable[[str, nn.Module], bool]
    layout: Callable[[nn.Module, str], FeatureLayout] = _default_layout
    input_size: Callable[[nn.Module], tuple[int, int, int]] = _default_input_size
    fixed_input_size: Callable[[nn.Module], bool] = _never_fixed

    def candidates(self, model: nn.Module) -> list[str]:
        """Names of the candidate exit modules, in registration order (checked later by a run)."""
        return [
            name
            for name, mod in model.named_modules()
            if name and self.is_exit_candidate(name, mod)
        ]


_ADAPTERS: Registry[BackboneAdapter] = Registry("backbone adapter")


def register_adapter(
    adapter: BackboneAdapter,
    *,
    overwrite: bool = False,
    first: bool = True,
    override: bool | None = None,
) -> BackboneAdapter:
    """Add a family, registered under ``adapter.family``.

    With ``first=True`` (default) it is tried before every adapter registered so far (the built-in
    ones included), so a user adapter can take over models a built-in family also matches. A family
    that is already registered is an error unless ``overwrite=True``, which replaces it.

    Args:
        adapter: the family's description.
        overwrite: replace an adapter registered under the same family name.
        first: try this adapter before the others (else after them).
        override: the former name of ``first`` (deprecated).

    Raises:
        ConfigError: the family is already registered and ``overwrite`` is False.

    Example:
        >>> import earlyexit as ee
        >>> ee.register_adapter(ee.BackboneAdapter("demo", lambda m: False, lambda n, m: False))
        BackboneAdapter(family='demo', ...)  # doctest: +SKIP
    """
    if not isinstance(adapter, BackboneAdapter):
        raise TypeError(f"register_adapter expects a BackboneAdapter, got {type(adapter).__name__}")
    if override is not None:
        warnings.warn(
            "register_adapter(override=...) is deprecated; pass first=... (tried before the other "
            "adapters) instead",
            DeprecationWarning,
            stacklevel=2,
        )
        first = override
    _ADAPTERS.register(adapter.family, adapter, overwrite=overwrite, first=first)
    return adapter


def unregister_adapter(family: str) -> None:
    """Remove the adapter registered under ``family`` (no error if there is none)."""
    _ADAPTERS.unregister(family)


def supported_families() -> tuple[str, ...]:
    """Names of every registered family, in the order they are tried."""
    return _ADAPTERS.names()


def find_adapter(model: nn.Module) -> BackboneAdapter:
    """The first registered adapter whose ``matches`` accepts ``model``.

    Raises:
        UnsupportedModelError: no adapter matches; the message lists the families and says how to
            register one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module classifier, got {type(model).__name__}")
    adapters = _ADAPTERS.values()
    for adapter in adapters:
        if adapter.matches(model):
            return adapter
    families = ", ".join(a.family for a in adapters)
    raise UnsupportedModelError(
        f"earlyexit does not know how to run {type(model).__module__}.{type(model).__name__} stage "
        f"by stage. Supported families: {families}. Either pass exits=[module names] whose outputs "
        "are the only input of the rest of the network (stage boundaries, checked when wrapping), or "
        "describe the family once with earlyexit.register_adapter(earlyexit.BackboneAdapter(family=..., "
        "matches=..., is_exit_candidate=...))."
    )
