"""Counting multiply-accumulates (MACs) in the convention of torchvision's published figures.

Convention (the one ``torchvision`` uses for ``weights.meta["_ops"]``, in GFLOPS where one
multiply-add is one op): count the multiply-accumulates of convolutions, linear layers and
matrix products (mm/addmm/bmm/baddbmm/einsum/matmul) and of attention (``Q @ K^T`` and
``attn @ V``, whichever kernel computes it, including the fused
``aten::_native_multi_head_attention`` fast path of :class:`torch.nn.MultiheadAttention`).
Normalisation, pooling, activations, softmax, elementwise ops and biases count zero.

Two independent counters implement it, so that each can check the other:

* :class:`MacCounter` / :func:`count_macs`: a ``TorchDispatchMode`` that reuses the shape
  formulas of :mod:`torch.utils.flop_counter` (FLOPs / 2) and adds the ones it lacks. It needs no
  tracing, reads out mid-forward, and runs on meta tensors, so a ViT-B/16 counts in milliseconds.
* :func:`fvcore_macs`: fvcore's ``FlopCountAnalysis`` (jit tracing) with the same convention,
  giving per-module totals and the operators it could not count.

One module on purpose (~800 lines): both counters share the convention's tables (which operators
are free, the attention formulas), and keeping them side by side is what keeps them in step.

Example:
    >>> import torch.nn as nn
    >>> count_macs(nn.Linear(8, 4), (1, 8))
    32
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MacCounter", "MacReport", "count_macs", "fvcore_macs"]

_log = logging.getLogger(__name__)
aten = torch.ops.aten

# --------------------------------------------------------------------------------------------
# Shape formulas shared by both counters (all in MACs, all per call, whole batch).
# --------------------------------------------------------------------------------------------


def _sdpa_macs(q: Sequence[int], k: Sequence[int], v: Sequence[int]) -> int:
    """MACs of softmax(Q K^T) V for q [..., L, E], k [..., S, E], v [..., S, Ev].

    The leading dims of ``q`` (batch x query heads) set the count: with grouped-query attention
    the key/value heads are broadcast, so each query head still does its own products.
    """
    length, e = q[-2], q[-1]
    s, ev = k[-2], v[-1]
    return math.prod(q[:-2]) * length * s * (e + ev)


def _mha_macs(q: Sequence[int], k: Sequence[int], embed_dim: int) -> int:
    """MACs of a full multi-head attention block (in-projections, attention, out-projection).

    ``q`` is [B, L, E] (batch first, as the fused kernels require) or [L, E]; ``k`` likewise with
    S tokens. Splitting E into heads does not change the products: sum over heads of L*S*(E/H).
    """
    n_q = math.prod(q[:-1])  # B * L query tokens
    n_kv = math.prod(k[:-1])  # B * S key/value tokens
    s = k[-2] if len(k) >= 2 else 1
    e = embed_dim
    proj = n_q * e * e + 2 * n_kv * e * e + n_q * e * e  # Q, K, V and output projections
    attn = 2 * n_q * s * e  # Q @ K^T and attn @ V
    return proj + attn


# --------------------------------------------------------------------------------------------
# Which operators are free in this convention (used to tell "zero" from "not understood").
# --------------------------------------------------------------------------------------------

# Tags that mark ops with no multiply-accumulates in this convention.
_FREE_TAGS = frozenset(
    {
        torch.Tag.pointwise,  # activations, elementwise arithmetic, clone
        torch.Tag.reduction,  # mean/sum/amax: pooling-like, not counted
        torch.Tag.nondeterministic_seeded,  # dropout, random fills
        torch.Tag.dynamic_output_shape,  # nonzero, unique, masked_select
        torch.Tag.data_dependent_output,  # .item() and friends
        torch.Tag.inplace_view,
        torch.Tag.view_copy,
    }
)

# Names of MAC-free ops that carry none of those tags (normalisation, softmax, pooling, data
# movement and tensor factories). Matched against the op name without namespace or overload.
_FREE_NAMES = frozenset(
    {
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional",
        "cudnn_batch_norm",
        "miopen_batch_norm",
        "instance_norm",
        "layer_norm",
        "native_layer_norm",
        "group_norm",
        "native_group_norm",
        "rms_norm",
        "_fused_rms_norm",
        "softmax",
        "_softmax",
        "_safe_softmax",
        "log_softmax",
        "_log_softmax",
        "hardswish",
        "prelu",
        "_prelu_kernel",
        "glu",
        "log_sigmoid_forward",
        "dropout",
        "feature_dropout",
        "alpha_dropout",
        "stochastic_depth",
        "cat",
        "stack",
        "_to_copy",
        "to",
        "copy",
        "copy_",
        "contiguous",
        "clone",
        "detach",
        "lift_fresh",
        "lift_fresh_copy",
        "constant_pad_nd",
        "pad",
        "index",
        "index_select",
        "index_put",
        "index_put_",
        "_index_put_impl_",
        "gather",
        "scatter",
        "scatter_add",
        "masked_fill",
        "masked_fill_",
        "embedding",
        "repeat",
        "roll",
        "flip",
        "tril",
        "triu",
        "topk",
        "sort",
        "argsort",
        "cumsum",
        "fill",
        "fill_",
        "zero_",
        "arange",
        "linspace",
        "zeros",
        "zeros_like",
        "ones",
        "ones_like",
        "full",
        "full_like",
        "scalar_tensor",
        "_local_scalar_dense",
        "Int",
        "ScalarImplicit",
        "size",
        "numel",
        "dim",
        "reshape",
        "flatten",
        "unflatten",
        "chunk",
        "split",
        "split_with_sizes",
        "unbind",
        "narrow",
        "_unsafe_view",
        "view",
        "permute",
        "transpose",
        "t",
        "expand",
        "expand_as",
        "squeeze",
        "unsqueeze",
        "select",
        "slice",
        "dropout_",
        "grid_sampler",
        "grid_sampler_2d",
        "einsum_path",
        "channel_shuffle",
        "pixel_shuffle",
        "pixel_unshuffle",
        "im2col",
        "col2im",
        "type_as",
        "floor_divide",
        "list",
        "tensor_split",
    }
)

# Prefixes of MAC-free op families with many members.
_FREE_PREFIXES = (
    "upsample_",
    "_upsample_",
    "max_pool",
    "avg_pool",
    "adaptive_",
    "_adaptive_",
    "fractional_max_pool",
    "lp_pool",
    "reflection_pad",
    "replication_pad",
    "empty",
    "new_",
    "as_strided",
    "_reshape",
    "native_dropout",
    "rand",
    "normal",
    "uniform",
    "bernoulli",
    "_has_compatible",
    "is_",
    "_assert",
    "resize",
    "_nested_",  # packing/unpacking ragged batches (padding masks)
    "to_padded_tensor",
)


def _free_by_name(name: str) -> bool:
    """``name`` is an op name without namespace or overload, e.g. ``"upsample_bilinear2d"``."""
    return name in _FREE_NAMES or name.startswith(_FREE_PREFIXES)


def _free_overload(func: torch._ops.OpOverload) -> bool:
    """True for an aten overload that does no multiply-accumulates in this convention."""
    if _FREE_TAGS.intersection(func.tags):
        return True
    # Pure views (outputs alias inputs without writing) move no data at all.
    returns = func._schema.returns
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return True
    name = func._overloadpacket.__name__
    # In-place variants (hardswish_, relu_, ...) cost what their out-of-place twin costs.
    return _free_by_name(name) or _free_by_name(name.rstrip("_"))


def _free_jit_name(kind: str) -> bool:
    """Same test for a TorchScript node kind such as ``"aten::gelu_"`` (used with fvcore)."""
    namespace, _, name = kind.partition("::")
    if namespace == "prim":
        # Structural nodes (constants, lists, getattr) are free; a PythonOp (custom autograd
        # Function) or CallFunction (scripted code) may hide any amount of compute.
        return not name.startswith(("PythonOp", "CallFunction"))
    if _free_by_name(name) or _free_by_name(name.rstrip("_")):
        return True
    packet = getattr(getattr(torch.ops, namespace, None), name, None)
    if packet is None and name.endswith("_"):  # in-place form of an out-of-place op
        packet = getattr(getattr(torch.ops, namespace, None), name[:-1], None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    overloads = [getattr(packet, o) for o in packet.overloads()]
    return any(_FREE_TAGS.intersection(o.tags) for o in overloads)


# --------------------------------------------------------------------------------------------
# MacCounter: dispatch-mode counter.
# --------------------------------------------------------------------------------------------

# A formula takes the raw (args, kwargs, out) of one call and returns MACs.
_Formula = Callable[[tuple[Any, ...], dict[str, Any], Any], int]


def _shape(t: Any) -> list[int]:
    return list(t.shape)


def _mha_macs_tensors(q: torch.Tensor, k: torch.Tensor, embed_dim: int) -> int:
    """:func:`_mha_macs` for tensors that may be nested (ragged sequences) or dense."""
    if q.is_nested or k.is_nested:
        # Ragged batch: per sample, projections scale with its tokens, attention with L_i * S_i.
        lq = [int(s[0]) for s in q._nested_tensor_size().tolist()] if q.is_nested else None
        lk = [int(s[0]) for s in k._nested_tensor_size().tolist()] if k.is_nested else None
        n = len(lq if lq is not None else lk)  # type: ignore[arg-type]
        lq = lq or [q.shape[-2]] * n
        lk = lk or [k.shape[-2]] * n
        pairs = zip(lq, lk, strict=True)
        return sum(_mha_macs([a, embed_dim], [b, embed_dim], embed_dim) for a, b in pairs)
    return _mha_macs(_shape(q), _shape(k), embed_dim)


def _native_mha_formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # _native_multi_head_attention(query, key, value, embed_dim, num_head, qkv_weight, ...)
    query, key, _value, embed_dim = args[:4]
    return _mha_macs_tensors(query, key, int(embed_dim))


def _encoder_layer_formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # _transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b,
    #   use_gelu, norm_first, eps, norm_w1, norm_b1, norm_w2, norm_b2, ffn_w1, ffn_b1, ffn_w2, ...)
    src, embed_dim = args[0], int(args[1])
    ffn_w1 = args[14]
    attn = _mha_macs_tensors(src, src, embed_dim)
    if src.is_nested:
        tokens = sum(int(s[0]) for s in src._nested_tensor_size().tolist())
    else:
        tokens = math.prod(src.shape[:-1])
    return attn + 2 * tokens * embed_dim * ffn_w1.shape[0]  # two FFN linears


def _sdpa_formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    q, k, v = args[:3]
    return _sdpa_macs(_shape(q), _shape(k), _shape(v))


def _mm_formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # _addmm_activation(self, mat1, mat2, ...): the mm part only.
    a, b = args[1], args[2]
    return a.shape[0] * a.shape[1] * b.shape[1]


def _mv_formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    mat = args[0] if args[0].dim() == 2 else args[1]  # mv(mat, vec) / addmv(self, mat, vec)
    return mat.shape[0] * mat.shape[1]


def _dot_formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    return args[0].numel()


def _from_flop_registry() -> dict[Any, _Formula]:
    """Wrap torch's FLOP formulas (2 FLOPs per MAC) as MAC formulas, keyed by op packet."""
    from torch.utils.flop_counter import flop_registry

    def wrap(f: Callable[..., int]) -> _Formula:
        # Every registered formula counts 2 per multiply-add (conv, mm, sdpa), so // 2 is exact.
        return lambda args, kwargs, out: f(*args, **kwargs, out_val=out) // 2

    packets = (k for k in flop_registry if isinstance(k, torch._ops.OpOverloadPacket))
    return {k: wrap(flop_registry[k]) for k in packets}


def _extra_formulas() -> dict[Any, _Formula]:
    """Formulas for what ``torch.utils.flop_counter`` lacks (looked up by name: ops differ by
    torch version, and a missing one must not break import)."""
    wanted: dict[str, _Formula] = {
        "_native_multi_head_attention": _native_mha_formula,
        "_transformer_encoder_layer_fwd": _encoder_layer_formula,
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_formula,
        "_scaled_dot_product_fused_attention_overrideable": _sdpa_formula,
        "_scaled_dot_product_flash_attention": _sdpa_formula,
        "_scaled_dot_product_efficient_attention": _sdpa_formula,
        "_scaled_dot_product_cudnn_attention": _sdpa_formula,
        "_addmm_activation": _mm_formula,
        "mv": _mv_formula,
        "addmv": _mv_formula,
        "dot": _dot_formula,
        "vdot": _dot_formula,
    }
    out: dict[Any, _Formula] = {}
    for name, formula in wanted.items():
        packet = getattr(aten, name, None)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            out[packet] = formula
    return out


_FORMULAS: dict[Any, _Formula] | None = None


def _formulas() -> dict[Any, _Formula]:
    global _FORMULAS
    if _FORMULAS is None:
        table = _from_flop_registry()
        for packet, formula in _extra_formulas().items():
            table.setdefault(packet, formula)  # torch's own formula wins where it has one
        _FORMULAS = table
    return _FORMULAS


# Queries about tensor metadata that reach dispatch modes; never counted, never reported.
_METADATA_OPS = frozenset(
    {
        aten.is_contiguous.default,
        aten.is_contiguous.memory_format,
        aten.is_strides_like_format.default,
        aten.is_non_overlapping_and_dense.default,
        aten.size.default,
        aten.sym_size.default,
        aten.stride.default,
        aten.sym_stride.default,
        aten.storage_offset.default,
        aten.sym_storage_offset.default,
        aten.numel.default,
        aten.sym_numel.default,
        aten.dim.default,
        torch.ops.prim.layout.default,
        torch.ops.prim.device.default,
    }
)


class _CountingMode(TorchDispatchMode):
    """The dispatch mode behind :class:`MacCounter`; adds every op's MACs to it as the op runs."""

    def __init__(self, counter: MacCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA_OPS:
            return NotImplemented
        formulas = self.counter._formulas
        packet = func._overloadpacket
        if packet not in formulas:
            # An implicit composite (e.g. linear, matmul) counts through what it decomposes into,
            # as in FlopCounterMode, so that both agree op for op.
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        self.counter._record(func, packet, args, kwargs, out)
        return out


class MacCounter:
    """Context manager counting the MACs of every op run inside it (the module's convention).

    It works on any callable (a model, part of one, a functional) and on CPU, CUDA and meta
    tensors, without tracing: a ``TorchDispatchMode`` applies shape formulas to each op as it
    runs. Formulas are torch's own (``torch.utils.flop_counter``, FLOPs / 2) plus the ones it
    lacks: the fused ``_native_multi_head_attention`` and ``_transformer_encoder_layer_fwd`` fast
    paths and the SDPA variants it misses (e.g. ``_scaled_dot_product_flash_attention_for_cpu``).

    ``total`` is a running count, readable inside the block (e.g. from a forward hook, to get the
    MACs spent up to that module) and after it. Entering resets the count; the counter is not
    re-entrant, and it counts the ops of the thread that entered it only (dispatch modes are
    thread-local), so other threads running the same model are not counted. An exception raised
    in the block propagates; ``total`` keeps what ran before it.

    ``by_op`` splits the total by operator; ``unsupported_ops`` lists operators that ran but were
    neither counted nor known to be free in this convention (with their number of calls), so a
    gap in coverage shows instead of silently counting zero.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> with MacCounter() as mc:
        ...     _ = net(torch.zeros(2, 8))
        >>> mc.total  # 2 samples * (8*16 + 16*4)
        384
    """

    def __init__(self, extra_formulas: dict[Any, Callable[..., int]] | None = None) -> None:
        """``extra_formulas`` maps an op packet (``torch.ops.ns.op``) to ``f(args, kwargs, out)``
        returning the MACs of one call, for custom ops; it overrides the built-in formulas."""
        self._formulas: dict[Any, _Formula] = {**_formulas(), **(extra_formulas or {})}
        self._total = 0
        self._by_op: Counter[str] = Counter()
        self._unsupported: Counter[str] = Counter()
        self._mode: _CountingMode | None = None

    def __enter__(self) -> MacCounter:
        if self._mode is not None:
            raise RuntimeError("MacCounter is not re-entrant; use a second MacCounter to nest")
        self._total = 0
        self._by_op.clear()
        self._unsupported.clear()
        self._mode = _CountingMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(*exc)  # pops the mode even when an exception is propagating

    @property
    def total(self) -> int:
        """MACs counted so far (whole batch, not per sample)."""
        return self._total

    @property
    def by_op(self) -> dict[str, int]:
        """MACs per operator, e.g. ``{"aten.convolution": ..., "aten.addmm": ...}``."""
        return dict(self._by_op)

    @property
    def unsupported_ops(self) -> dict[str, int]:
        """Operator -> number of calls that were neither counted nor known to be MAC-free."""
        return dict(self._unsupported)

    def _record(
        self,
        func: torch._ops.OpOverload,
        packet: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
    ) -> None:
        formula = self._formulas.get(packet)
        if formula is None:
            if not _free_overload(func):
                self._unsupported[str(packet)] += 1
            return
        try:
            macs = int(formula(args, kwargs, out))
        except Exception:  # a formula that cannot read these args must not break the forward
            _log.debug("MAC formula for %s failed", packet, exc_info=True)
            self._unsupported[str(packet)] += 1
            return
        self._total += macs
        self._by_op[str(packet)] += macs


# --------------------------------------------------------------------------------------------
# count_macs
# --------------------------------------------------------------------------------------------


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be non-empty positive sizes, got {tuple(input_shape)}")
    return shape


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in model.parameters():
        if t.is_floating_point():
            return t.device, t.dtype
    for t in model.buffers():
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _meta_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no memory).

    Pre-seeding deepcopy's memo with meta twins means no real tensor data is copied, and the
    original model is never touched (unlike ``functional_call``, which swaps tensors in place
    and would be visible to another thread running the model).
    """
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        cast = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        twin = torch.empty_like(t, device="meta", dtype=cast)
        if isinstance(t, nn.Parameter):
            twin = nn.Parameter(twin, requires_grad=t.requires_grad)
        memo[id(t)] = twin
    return copy.deepcopy(model, memo).eval()


def _run_count(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), MacCounter() as mc:
        model(x)
    return mc.total


def _per_sample(total: int, batch: int) -> int:
    return (total + batch // 2) // batch  # rounded, in integers (exact when batch divides it)


def count_macs(
    model: Any,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """Per-sample MACs of ``model(x)`` for ``x`` of ``input_shape`` (total / batch size).

    Counted in eval mode under ``torch.no_grad()`` (inference cost; in these families train mode
    adds no MACs anyway). The model's mode, parameters and buffers are never changed.

    ``device=None`` (default) first runs a meta-device copy of the model (shapes only: no memory,
    no compute; ViT-B/16 in well under a second) and, if some op has no meta kernel or the model
    is data-dependent, falls back to a real forward pass on the model's own device.
    ``device="meta"`` allows only the meta pass; any other device runs a real forward there
    (on a copy if the model lives elsewhere). ``dtype`` is the input dtype (default: the model's).

    Objects other than plain modules can take part by defining
    ``count_macs(input_shape, *, device=None, dtype=None) -> int`` (the early-exit wrapper does);
    that method is called instead.

    Example:
        >>> import torch.nn as nn
        >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), (1, 3, 32, 32))  # 32*32 * 8 * 3*3*3
        221184
    """
    own = getattr(model, "count_macs", None)
    if callable(own):  # hook point: wrappers (EarlyExitModel) know their own paths
        return int(own(input_shape, device=device, dtype=dtype))
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_macs expects an nn.Module, got {type(model).__name__}")
    shape = _check_shape(input_shape)
    model_device, model_dtype = _model_device_dtype(model)
    dtype = dtype or model_dtype
    target = torch.device(device) if device is not None else None

    if target is None or target.type == "meta":
        try:
            meta_model = _meta_copy(model, dtype)
            total = _run_count(meta_model, torch.zeros(shape, device="meta", dtype=dtype))
            return _per_sample(total, shape[0])
        except Exception:
            if target is not None:
                raise
            # No meta kernel for some op, data-dependent control flow, a tensor kept outside
            # parameters/buffers, ...: count on real tensors instead.
            _log.debug("meta-device MAC count failed; running on %s", model_device, exc_info=True)
        target = model_device

    run_model = model
    if model.training or target != model_device:
        # A copy, so that eval() and .to() leave the caller's model (and BN statistics) alone.
        run_model = copy.deepcopy(model).to(target).eval()
    total = _run_count(run_model, torch.zeros(shape, device=target, dtype=dtype))
    return _per_sample(total, shape[0])


# --------------------------------------------------------------------------------------------
# fvcore
# --------------------------------------------------------------------------------------------


@dataclass
class MacReport:
    """MACs of one model at one input size, per sample.

    Attributes:
        total: per-sample MACs of the whole model.
        by_module: per-sample MACs per module name (``""`` = whole model).
        unsupported_ops: operator -> number of occurrences that were not counted and are not
            known to be MAC-free (each is a potential under-count; empty when coverage is full).
    """

    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    unsupported_ops: dict[str, int] = field(default_factory=dict)


# fvcore counts these by default (norms, upsampling, pooling, grid sampling); the published
# convention does not. They get a handle returning 0: a ``None`` handle would not do, because
# fvcore looks up its default handles before its ignore list.
_FVCORE_ZEROED = (
    "aten::batch_norm",
    "aten::group_norm",
    "aten::layer_norm",
    "aten::instance_norm",
    "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d",
    "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
)


def _zero_handle(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


def _fvcore_handles() -> dict[str, Callable[[list[Any], list[Any]], int]]:
    """jit handles (inputs, outputs) -> MACs for the ops fvcore does not count."""
    from fvcore.nn.jit_handles import get_shape

    def ivalue(v: Any) -> Any:
        return v.toIValue()

    def sdpa(inputs: list[Any], outputs: list[Any]) -> int:
        q, k, v = (get_shape(x) for x in inputs[:3])
        return _sdpa_macs(q, k, v)

    def native_mha(inputs: list[Any], outputs: list[Any]) -> int:
        q, k = get_shape(inputs[0]), get_shape(inputs[1])
        return _mha_macs(q, k, int(ivalue(inputs[3])))

    def encoder_layer(inputs: list[Any], outputs: list[Any]) -> int:
        src, e, ffn = get_shape(inputs[0]), int(ivalue(inputs[1])), get_shape(inputs[14])
        return _mha_macs(src, src, e) + 2 * math.prod(src[:-1]) * e * ffn[0]

    def baddbmm(inputs: list[Any], outputs: list[Any]) -> int:
        a, b = get_shape(inputs[1]), get_shape(inputs[2])
        return a[0] * a[1] * a[2] * b[2]

    def addmm_like(inputs: list[Any], outputs: list[Any]) -> int:
        a, b = get_shape(inputs[1]), get_shape(inputs[2])
        return a[0] * a[1] * b[1]

    def mv(inputs: list[Any], outputs: list[Any]) -> int:
        a, b = get_shape(inputs[0]), get_shape(inputs[1])
        mat = a if len(a) == 2 else b
        return mat[0] * mat[1]

    def addmv(inputs: list[Any], outputs: list[Any]) -> int:
        mat = get_shape(inputs[1])
        return mat[0] * mat[1]

    def dot(inputs: list[Any], outputs: list[Any]) -> int:
        return math.prod(get_shape(inputs[0]))

    def conv(inputs: list[Any], outputs: list[Any]) -> int:
        # aten::conv{1,2,3}d(input, weight, ...) as recorded by newer tracers; MACs per output
        # element = C_in/groups * prod(kernel); weight is [C_out, C_in/groups, *kernel].
        w, y = get_shape(inputs[1]), get_shape(outputs[0])
        return math.prod(y) * math.prod(w[1:])

    return {
        "aten::scaled_dot_product_attention": sdpa,
        "aten::_scaled_dot_product_flash_attention_for_cpu": sdpa,
        "aten::_scaled_dot_product_flash_attention": sdpa,
        "aten::_scaled_dot_product_efficient_attention": sdpa,
        "aten::_native_multi_head_attention": native_mha,
        "aten::_transformer_encoder_layer_fwd": encoder_layer,
        "aten::baddbmm": baddbmm,
        "aten::addbmm": baddbmm,
        "aten::_addmm_activation": addmm_like,
        "aten::mv": mv,
        "aten::addmv": addmv,
        "aten::dot": dot,
        "aten::conv1d": conv,
        "aten::conv2d": conv,
        "aten::conv3d": conv,
    }


def fvcore_macs(
    model: nn.Module,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    *,
    dtype: torch.dtype | None = None,
) -> MacReport:
    """Per-sample MACs by fvcore's ``FlopCountAnalysis``, aligned to the published convention.

    fvcore's defaults also count batch/layer/group/instance norm, upsampling, adaptive pooling and
    grid sampling (zeroed here), and miss fused attention (``scaled_dot_product_attention``,
    ``_native_multi_head_attention``) and a few matrix ops (``baddbmm``, ``mv``, ...), added here.
    Operators it still cannot count are returned in ``unsupported_ops`` (MAC-free ones such as
    activations, softmax and elementwise arithmetic are filtered out), never silently dropped.

    The model is traced on its own device in eval mode under ``torch.no_grad()``; a model in
    train mode is traced on a copy, so its mode and BN statistics are left alone.

    Example:
        >>> import torch.nn as nn
        >>> r = fvcore_macs(nn.Sequential(nn.Linear(8, 16), nn.GELU()), (1, 8))
        >>> r.total, r.by_module["0"], r.unsupported_ops
        (128, 128, {})
    """
    with warnings.catch_warnings():  # fvcore's import jit-scripts a loss; torch deprecates that
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    shape = _check_shape(input_shape)
    model_device, model_dtype = _model_device_dtype(model)
    run_model = copy.deepcopy(model).eval() if model.training else model
    x = torch.zeros(shape, device=model_device, dtype=dtype or model_dtype)
    analysis = FlopCountAnalysis(run_model, x)
    analysis.set_op_handle(**dict.fromkeys(_FVCORE_ZEROED, _zero_handle), **_fvcore_handles())
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with torch.no_grad():  # as count_macs: inference, so the same fused fast paths are taken
        total = analysis.total()
        by_module = analysis.by_module()
        unsupported = analysis.unsupported_ops()
    batch = shape[0]
    return MacReport(
        total=_per_sample(total, batch),
        by_module={name: _per_sample(v, batch) for name, v in by_module.items()},
        unsupported_ops={op: n for op, n in unsupported.items() if not _free_jit_name(op)},
    )
