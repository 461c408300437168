"""Exit heads: small classifiers attached at intermediate layers, and their registry.

The registry follows the library's one convention (:mod:`earlyexit._registry`): a taken name is an
error unless ``overwrite=True``, an unknown name is an error that lists the known ones, and every
operation is thread-safe.

Every head splits into two parts so online learning can keep a bounded replay of what it saw:

* ``reduce(feature)``: parameter-free pooling of the backbone feature to a compact tensor ``z``
  (a vector, or a 4x4 grid for the conv head), done the way the model's own head pools
  (class token or token mean for ViTs, channels-last maps for Swin);
* ``classify(z)``: the trainable part, which maps ``z`` to logits.

``head(feature) == head.classify(head.reduce(feature))``. The last layer of every built-in head
starts at zero, so a new head predicts the uniform distribution: its gate cannot open by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .._registry import Registry
from ..backbones import FeatureLayout
from ..errors import ConfigError


@dataclass(frozen=True)
class HeadSpec:
    """Everything a head factory needs to size a head, known without the user's help.

    Attributes:
        channels: channels of the feature at this exit.
        num_classes: number of classes of the base model.
        layout: how the feature is laid out (see :class:`FeatureLayout`).
        feature_shape: per-sample feature shape at the model's input size (no batch dim).
        mac_budget: MACs per sample this head may spend (a share of the base model's MACs).
    """

    channels: int
    num_classes: int
    layout: FeatureLayout
    feature_shape: tuple[int, ...]
    mac_budget: int


def pool_vector(feature: Tensor, layout: FeatureLayout) -> Tensor:
    """``[B, C]`` summary of a feature, pooled like the model's own head pools."""
    if layout.kind == "nchw":
        return feature.mean(dim=(2, 3)) if feature.dim() == 4 else feature.flatten(1)
    if layout.kind == "nhwc":
        return feature.mean(dim=(1, 2))
    if layout.token_pool == "cls":
        return feature[:, 0]
    return feature[:, layout.prefix_tokens :].mean(dim=1)


def pool_grid(feature: Tensor, layout: FeatureLayout, size: int) -> Tensor:
    """``[B, C, size, size]`` average-pooled map of a feature (tokens are put back on their grid)."""
    if layout.kind == "nhwc":
        feature = feature.permute(0, 3, 1, 2)
    elif layout.kind == "tokens":
        patches = feature[:, layout.prefix_tokens :]
        side = round(patches.shape[1] ** 0.5)
        if side * side != patches.shape[1]:
            raise ConfigError(
                f"a conv head needs a square grid of patch tokens; got {patches.shape[1]} tokens "
                "after the prefix tokens. Use head='linear' or 'mlp' for this model."
            )
        feature = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)
    return F.adaptive_avg_pool2d(feature, size)


class ExitHead(nn.Module):
    """Base class of exit heads: subclasses define :meth:`reduce` and :meth:`classify`."""

    kind: str = "custom"

    def __init__(self, layout: FeatureLayout) -> None:
        super().__init__()
        self.layout = layout

    def reduce(self, feature: Tensor) -> Tensor:
        """Parameter-free pooling of a backbone feature to the compact tensor ``classify`` takes."""
        return pool_vector(feature, self.layout)

    def classify(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, feature: Tensor) -> Tensor:
        return self.classify(self.reduce(feature))


class LinearHead(ExitHead):
    """Pooled feature -> LayerNorm -> Linear. The norm lets one learning rate suit every depth.

    Example:
        >>> head = LinearHead(FeatureLayout("nchw"), channels=64, num_classes=10)
        >>> head(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 10])
    """

    kind = "linear"

    def __init__(self, layout: FeatureLayout, channels: int, num_classes: int) -> None:
        super().__init__(layout)
        self.norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, num_classes)
        _zero(self.fc)

    def classify(self, z: Tensor) -> Tensor:
        return self.fc(self.norm(z))


class MLPHead(ExitHead):
    """Pooled feature -> LayerNorm -> Linear -> GELU -> Linear.

    Example:
        >>> head = MLPHead(FeatureLayout("nchw"), channels=64, num_classes=10, hidden=32)
        >>> head(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 10])
    """

    kind = "mlp"

    def __init__(self, layout: FeatureLayout, channels: int, num_classes: int, hidden: int) -> None:
        super().__init__(layout)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        _zero(self.fc2)

    def classify(self, z: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(z))))


class ConvHead(ExitHead):
    """4x4 pooled map -> 1x1 conv -> GELU -> depthwise 3x3 conv -> GELU -> mean -> LayerNorm -> Linear.

    Keeps some spatial layout (where things are), which a pooled vector throws away; the pooling to
    4x4 first keeps it cheap and lets replay store a small ``z``.

    Example:
        >>> head = ConvHead(FeatureLayout("nchw"), channels=64, num_classes=10, hidden=32)
        >>> head(torch.randn(2, 64, 14, 14)).shape
        torch.Size([2, 10])
    """

    kind = "conv"
    grid = 4

    def __init__(self, layout: FeatureLayout, channels: int, num_classes: int, hidden: int) -> None:
        super().__init__(layout)
        self.pointwise = nn.Conv2d(channels, hidden, kernel_size=1)
        self.depthwise = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, num_classes)
        _zero(self.fc)

    def reduce(self, feature: Tensor) -> Tensor:
        return pool_grid(feature, self.layout, self.grid)

    def classify(self, z: Tensor) -> Tensor:
        # The 1x1 conv as a matmul over channels (same weights): on one CPU thread PyTorch runs
        # 1x1 convs of fewer than 16 rows with a per-sample reference kernel, several times
        # slower on a 4x4 map; the result comes out channels-last, which the depthwise conv takes.
        w = self.pointwise.weight
        h = F.linear(z.permute(0, 2, 3, 1), w.view(w.shape[0], w.shape[1]), self.pointwise.bias)
        h = F.gelu(self.depthwise(F.gelu(h.permute(0, 3, 1, 2))))
        return self.fc(self.norm(h.mean(dim=(2, 3))))


class _ModuleOnPooledVector(ExitHead):
    """Adapts a user module mapping ``[B, C]`` pooled features to logits into an :class:`ExitHead`."""

    kind = "custom"

    def __init__(self, layout: FeatureLayout, module: nn.Module) -> None:
        super().__init__(layout)
        self.module = module

    def classify(self, z: Tensor) -> Tensor:
        return self.module(z)


def _zero(layer: nn.Module) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _hidden_width(budget: int, per_unit_macs: int, low: int = 32, high: int = 1024) -> int:
    """Largest width whose MACs fit the budget, clamped to a sensible range."""
    return int(max(low, min(high, budget // max(per_unit_macs, 1))))


HeadFactory = Callable[[HeadSpec], nn.Module]

_HEADS: Registry[HeadFactory] = Registry("head")


def register_head(name: str, factory: HeadFactory, *, overwrite: bool = False) -> None:
    """Make ``head=name`` available in :func:`earlyexit.wrap`.

    ``factory(spec)`` returns an :class:`ExitHead`, or a plain module mapping pooled ``[B, C]``
    features to logits (it is then wrapped to pool like the model does).

    Raises:
        ConfigError: ``name`` is already registered and ``overwrite`` is False.

    Example:
        >>> register_head("wide_linear", lambda spec: nn.Linear(spec.channels, spec.num_classes))
        >>> "wide_linear" in head_kinds()
        True
        >>> unregister_head("wide_linear")
    """
    _HEADS.register(name, factory, overwrite=overwrite)


def unregister_head(name: str) -> None:
    """Remove the head registered as ``name`` (no error if there is none).

    Example:
        >>> unregister_head("not_registered")
    """
    _HEADS.unregister(name)


def head_kinds() -> tuple[str, ...]:
    """Names accepted by ``wrap(head=...)``, sorted.

    Example:
        >>> head_kinds()[:3]
        ('conv', 'linear', 'mlp')
    """
    return tuple(sorted(_HEADS.names()))


def head_factory(head: str | HeadFactory) -> HeadFactory:
    """The factory behind a registered name (or ``head`` itself when it is a callable).

    Raises:
        ConfigError: an unknown name (the known ones are listed), or neither a name nor a callable.

    Example:
        >>> callable(head_factory("linear"))
        True
    """
    if isinstance(head, str):
        return _HEADS.get(head, alternative=" or pass a callable spec -> nn.Module")
    if callable(head):
        return head
    raise ConfigError(f"head must be a name or a callable, got {type(head).__name__}")


def build_head(head: str | HeadFactory, spec: HeadSpec) -> ExitHead:
    """Build one head for ``spec`` from a registered name or a factory callable."""
    module = head_factory(head)(spec)
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"the head factory returned {type(module).__name__}, expected an nn.Module"
        )
    if not isinstance(module, ExitHead):
        module = _ModuleOnPooledVector(spec.layout, module)
    return module


register_head("linear", lambda s: LinearHead(s.layout, s.channels, s.num_classes))
register_head(
    "mlp",
    lambda s: MLPHead(
        s.layout, s.channels, s.num_classes, _hidden_width(s.mac_budget, s.channels + s.num_classes)
    ),
)
register_head(
    "conv",
    lambda s: ConvHead(
        s.layout,
        s.channels,
        s.num_classes,
        _hidden_width(
            s.mac_budget,
            ConvHead.grid**2 * (s.channels + 9) + s.num_classes,
        ),
    ),
)

__all__ = [
    "ConvHead",
    "ExitHead",
    "HeadSpec",
    "LinearHead",
    "MLPHead",
    "build_head",
    "head_factory",
    "head_kinds",
    "pool_grid",
    "pool_vector",
    "register_head",
    "unregister_head",
]
