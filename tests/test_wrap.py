"""Wrapping and serving: the invariants of the design, on every supported family."""

from __future__ import annotations

import gc
import math
import threading

import pytest
import torch
from conftest import FAMILIES, batch
from torch import nn

import earlyexit as ee
from earlyexit.gates import Gate, GateContext


class ScriptedGate(Gate):
    """Test gate: exit ``i`` lets out exactly the caller rows listed in ``plan[i]``."""

    name = "scripted"

    def __init__(self, plan: dict[int, set[int]]) -> None:
        self.plan = plan

    def score(self, logits: torch.Tensor, ctx: GateContext) -> torch.Tensor:
        chosen = self.plan.get(ctx.exit_index, set())
        return torch.tensor([1.0 if int(r) in chosen else 0.0 for r in ctx.rows])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def test_gates_closed_equals_base_model_on_every_family(family_model):
    _family, model, size = family_model
    before = _snapshot(model)
    eem = ee.wrap(model, input_size=size)
    assert all(t == math.inf for t in eem.thresholds)
    x = batch(size, n=3)
    expected = model(x)
    res = eem.predict(x)
    assert res.logits.dtype == expected.dtype
    torch.testing.assert_close(res.logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.exit_index, torch.full((3,), eem.num_exits))
    assert res.accepted.all()
    _assert_same_state(model, before)
    assert not model.training


def test_mixed_exits_skip_later_layers_and_keep_input_order(family_model):
    _family, model, size = family_model
    eem = ee.wrap(model, input_size=size)
    n_exits = eem.num_exits
    batch_size = n_exits + 3
    # Row k leaves at exit k (k < n_exits); the remaining rows run to the end.
    plan = {k: {k} for k in range(n_exits)}
    eem.gate = ScriptedGate(plan)
    eem.set_thresholds([0.5] * n_exits)
    x = batch(size, n=batch_size)
    full = model(x)

    # Record, in completion order, every leaf module's batch size and when each exit fires.
    events: list[tuple[str, int]] = []
    handles = []
    exit_names = {e.name: i for i, e in enumerate(eem.exits)}
    for name, module in model.named_modules():
        if name in exit_names:
            # Registered after the wrapper's hook: fires right after it, sees the shrunk output.
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, i=exit_names[name]: events.append((f"<exit{i}>", o.shape[0]))
                )
            )
        elif not list(module.children()):
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, n=name: events.append((n, a[0].shape[0] if a else -1))
                )
            )
    try:
        plain = list(events)  # hooks are inert for direct calls: the full batch everywhere
        assert not plain
        model(x)
        plain, events[:] = list(events), []
        res = eem.predict(x)
    finally:
        for h in handles:
            h.remove()

    expected_exit = torch.tensor([min(r, n_exits) for r in range(batch_size)])
    assert torch.equal(res.exit_index, expected_exit)
    # Rows that ran to the end carry exactly the base model's logits, in input order.
    torch.testing.assert_close(res.logits[n_exits:], full[n_exits:], rtol=1e-4, atol=1e-4)
    # Rows that left carry their head's logits (zero-initialised heads give zeros).
    assert torch.equal(res.logits[:n_exits], torch.zeros(n_exits, full.shape[1]))

    # The same layers run in the same order, but after exit k fired every layer processes the
    # rows of batch_size - (k + 1) samples (attention windows multiply rows, so compare ratios).
    assert [n for n, _ in events] == [n for n, _ in plain]
    running = batch_size
    fired = 0
    for (name, rows), (_, plain_rows) in zip(events, plain, strict=True):
        if name.startswith("<exit"):
            assert name == f"<exit{fired}>"
            fired += 1
            running = batch_size - fired
            assert rows == running
        elif rows >= 0:
            assert rows * batch_size == plain_rows * running, (
                f"{name} ran on {rows} rows ({plain_rows} in the full run) after {fired} exits"
            )
    assert fired == n_exits


def test_all_samples_exit_at_first_exit_runs_nothing_after_it(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    eem.set_thresholds([-math.inf] + [math.inf] * (eem.num_exits - 1))
    calls: list[str] = []
    first_exit = eem.exits[0].name
    order = [n for n, _ in resnet.named_modules()]
    after = [
        n
        for n in order
        if order.index(n) > order.index(first_exit) and not n.startswith(first_exit)
    ]
    handles = [
        resnet.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.append(n))
        for n in after
        if n
    ]
    res = eem.predict(batch(n=5))
    for h in handles:
        h.remove()
    assert torch.equal(res.exit_index, torch.zeros(5, dtype=torch.long))
    assert calls == []


def test_head_cost_is_small_for_every_default_head(family_model):
    _family, model, size = family_model
    for kind in ("linear", "mlp", "conv"):
        eem = ee.wrap(model, head=kind, input_size=size, validate=False)
        for point, macs in zip(eem.exits, eem.head_macs, strict=True):
            assert macs <= 0.02 * eem.base_macs, (
                f"{kind} head at {point.name} costs {macs / eem.base_macs:.2%}"
            )
        eem.remove()


def test_exit_points_describe_cumulative_macs(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64), head="mlp")
    macs = [e.macs for e in eem.exits]
    assert macs == sorted(macs) and macs[-1] < eem.base_macs
    for i, point in enumerate(eem.exits):
        assert point.macs == eem.backbone_macs[i] + sum(eem.head_macs[: i + 1])
        assert point.channels == eem.heads[i].norm.normalized_shape[0]
        assert eem.candidates[point.index] == point.name
    # Rebuilding from indices gives the same exits.
    again = ee.wrap(resnet, exits=[e.index for e in eem.exits], input_size=(3, 64, 64))
    assert [e.name for e in again.exits] == [e.name for e in eem.exits]


def test_auto_places_exits_spread_by_macs(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64), num_exits=3)
    fractions = [m / eem.base_macs for m in eem.backbone_macs]
    assert len(fractions) == 3
    assert fractions == sorted(fractions)
    assert fractions[0] < 0.4 and fractions[-1] > 0.55


def test_explicit_exits_by_name_and_index_are_sorted_by_execution(resnet):
    eem = ee.wrap(resnet, exits=["layer3.0", 1], input_size=(3, 64, 64))
    assert [e.name for e in eem.exits] == ["layer1.1", "layer3.0"]


def test_base_model_state_and_mode_untouched_by_serving(resnet):
    before = _snapshot(resnet)
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    eem.set_thresholds([0.0, 0.0, 0.0, 0.0])  # everything leaves at exit 0
    eem.predict(batch())
    eem.set_thresholds([math.inf] * eem.num_exits)
    eem.predict(batch())
    _assert_same_state(resnet, before)
    assert not resnet.training


def test_wrapping_a_model_in_training_mode_keeps_its_mode_and_buffers():
    model = FAMILIES["timm.resnet"][0]().train()
    before = _snapshot(model)
    eem = ee.wrap(model, input_size=(3, 64, 64))
    assert model.training and all(m.training for m in model.modules())
    _assert_same_state(model, before)
    with pytest.raises(ee.InputError, match="training mode"):
        eem.predict(batch())
    _assert_same_state(model, before)


def test_hooks_are_inert_for_direct_calls_and_other_threads(resnet):
    x = batch()
    expected = resnet(x)
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    eem.set_thresholds([-math.inf] * eem.num_exits)  # inside eem calls everything leaves at once
    torch.testing.assert_close(resnet(x), expected, rtol=0, atol=0)

    seen: dict[str, torch.Tensor] = {}

    class CallsBaseFromAnotherThread(Gate):
        name = "meddler"

        def score(self, logits, ctx):
            # While this wrapper's hooks are live on this thread, call the base model elsewhere.
            worker = threading.Thread(target=lambda: seen.setdefault("other", resnet(x)))
            worker.start()
            worker.join()
            return torch.ones(logits.shape[0])

    eem.gate = CallsBaseFromAnotherThread()
    res = eem.predict(x)
    assert torch.equal(res.exit_index, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(seen["other"], expected, rtol=0, atol=0)


def test_remove_and_garbage_collection_detach_hooks(resnet):
    def hook_count() -> int:
        return sum(len(m._forward_hooks) for m in resnet.modules())

    assert hook_count() == 0
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    assert hook_count() == eem.num_exits
    eem.remove()
    assert hook_count() == 0
    with pytest.raises(RuntimeError, match="removed"):
        eem.predict(batch())

    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    assert hook_count() == eem.num_exits
    del eem
    gc.collect()
    assert hook_count() == 0


def test_inference_mode_channels_last_and_low_precision(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    x = batch()
    with torch.inference_mode():
        torch.testing.assert_close(eem(x), resnet(x), rtol=1e-5, atol=1e-5)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(eem(x_cl), resnet(x_cl), rtol=1e-5, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        model = FAMILIES["timm.resnet"][0]().eval().to(dtype)
        low = ee.wrap(model, input_size=(3, 64, 64))
        assert low.heads[0].fc.weight.dtype == dtype
        xl = x.to(dtype)
        out = low(xl)
        assert out.dtype == dtype
        assert torch.equal(out, model(xl))
        low.set_thresholds([-math.inf] * low.num_exits)
        assert low.predict(xl).logits.dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = eem(x)
        assert torch.equal(out, resnet(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_serving_matches_base_model():
    model = FAMILIES["timm.resnet"][0]().eval().cuda()
    eem = ee.wrap(model, input_size=(3, 64, 64))
    x = batch().cuda()
    torch.testing.assert_close(eem(x), model(x))
    eem.set_thresholds([-math.inf] * eem.num_exits)
    assert eem.predict(x).exit_index.device.type == "cuda"
    with pytest.raises(ee.InputError, match="on cpu but the model is on cuda"):
        eem.predict(x.cpu())


def test_empty_batch_has_a_defined_answer(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    res = eem.predict(torch.zeros(0, 3, 64, 64))
    assert res.logits.shape == (0, 10)
    assert res.exit_index.shape == res.confidence.shape == res.accepted.shape == (0,)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.randn(3, 64, 64), "single image"),
        (torch.randn(2, 64, 64, 3), "channels last"),
        (torch.randn(2, 1, 64, 64), "expected 3 channels"),
        (torch.randn(2, 3, 64), "expected a batch of images"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), "floating-point"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.float64), "float64 but the model is torch.float32"),
        (torch.full((2, 3, 64, 64), float("nan")), "NaN or Inf"),
        (torch.tensor([[[[float("inf")]]]]).expand(2, 3, 64, 64), "NaN or Inf"),
        ([[1.0]], "expected a torch.Tensor"),
        (torch.randn(2, 3, 0, 5), "images are empty"),
    ],
)
def test_bad_input_gets_a_clear_error(resnet, bad, message):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    eem.set_thresholds([0.5] * eem.num_exits)
    with pytest.raises(ee.InputError, match=message):
        eem.predict(bad)
    assert eem.thresholds == (0.5,) * eem.num_exits


def test_nan_check_is_exact_where_a_sum_would_overflow():
    from earlyexit.exit_hooks import all_finite

    one_nan = torch.randn(2, 3, 8, 8)
    one_nan[1, 2, 3, 4] = float("nan")
    assert not all_finite(one_nan)
    assert not all_finite(torch.tensor([1.0, -float("inf")]))
    assert all_finite(torch.full((4,), 3e38))  # finite values whose sum overflows float32
    assert all_finite(torch.full((2, 3, 64, 64), 60000.0, dtype=torch.float16))  # fp16 sums
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))


def test_a_size_the_model_cannot_take_is_a_clear_error():
    builder, size = FAMILIES["timm.convnext"]
    eem = ee.wrap(builder().eval(), input_size=size)
    with pytest.raises(ee.InputError, match=r"could not process an input of size \(8, 8\)"):
        eem.predict(torch.randn(2, 3, 8, 8))


def test_fixed_size_models_reject_other_sizes():
    builder, size = FAMILIES["timm.vit"]
    eem = ee.wrap(builder().eval(), input_size=size)
    with pytest.raises(ee.InputError, match="only takes 64x64"):
        eem.predict(torch.randn(1, 3, 96, 96))


def test_input_on_another_device_is_rejected(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    with pytest.raises(ee.InputError, match="on meta but the model is on cpu"):
        eem.predict(torch.empty(2, 3, 64, 64, device="meta"))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"head": "transformer"}, ee.ConfigError, "unknown head 'transformer'"),
        ({"gate": "vibes"}, ee.ConfigError, "unknown gate 'vibes'"),
        ({"exits": [99]}, ee.ConfigError, "out of range"),
        ({"exits": ["layer9"]}, ee.ConfigError, "no module named 'layer9'"),
        ({"exits": ["layer1.0", "layer1.0"]}, ee.ConfigError, "given twice"),
        ({"exits": [0, "layer1.0"]}, ee.ConfigError, "given twice"),
        ({"exits": []}, ee.ConfigError, "exits is empty"),
        ({"exits": "some"}, ee.ConfigError, "'auto' or a list"),
        ({"num_exits": 0}, ee.ConfigError, "at least 1"),
        ({"exits": ["layer1.0.conv1"]}, ee.UnsupportedModelError, "skip connection"),
        ({"exits": ["layer1.0.bn1"]}, ee.UnsupportedModelError, "skip connection"),
    ],
)
def test_bad_wrap_arguments_get_clear_errors(resnet, kwargs, error, message):
    kwargs.setdefault("input_size", (3, 64, 64))
    with pytest.raises(error, match=message):
        ee.wrap(resnet, **kwargs)
    assert sum(len(m._forward_hooks) for m in resnet.modules()) == 0


def test_set_thresholds_validates(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    with pytest.raises(ee.ConfigError, match="expected 4 thresholds"):
        eem.set_thresholds([0.5])
    with pytest.raises(ee.ConfigError, match="NaN"):
        eem.set_thresholds([0.5, float("nan"), 0.5, 0.5])
    with pytest.raises(ee.ConfigError, match="must be a number"):
        eem.set_thresholds([0.5, "high", 0.5, 0.5])
    assert eem.thresholds == (math.inf,) * 4


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(4)]
        )
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def test_unknown_family_error_names_families_and_registration():
    with pytest.raises(
        ee.UnsupportedModelError, match=r"Supported families: .*timm\.resnet.*register_adapter"
    ):
        ee.wrap(_TinyNet().eval(), input_size=(3, 16, 16))


def test_user_registered_family_and_explicit_names_on_unknown_models():
    model = _TinyNet().eval()
    eem = ee.wrap(model, exits=["blocks.0", "blocks.2"], input_size=(3, 16, 16))
    assert eem.family == "generic"
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(eem(x), model(x))

    adapter = ee.BackboneAdapter(
        family="test.tinynet",
        matches=lambda m: isinstance(m, _TinyNet),
        is_exit_candidate=lambda name, module: name.count(".") == 1 and name.startswith("blocks."),
        input_size=lambda m: (3, 16, 16),
    )
    ee.register_adapter(adapter)
    try:
        assert ee.supported_families()[0] == "test.tinynet"
        assert ee.exit_candidates(model) == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
        eem = ee.wrap(model, num_exits=2)
        assert eem.family == "test.tinynet" and eem.num_exits == 2
        eem.set_thresholds([-math.inf, math.inf])
        assert torch.equal(eem.predict(x).exit_index, torch.zeros(3, dtype=torch.long))
    finally:
        ee.unregister_adapter("test.tinynet")
    assert "test.tinynet" not in ee.supported_families()


def test_custom_head_callable(resnet):
    eem = ee.wrap(
        resnet, head=lambda spec: nn.Linear(spec.channels, spec.num_classes), input_size=(3, 64, 64)
    )
    assert eem.head_kind == "custom"
    eem.set_thresholds([-math.inf] + [math.inf] * 3)
    assert eem.predict(batch()).logits.shape == (4, 10)


def test_token_heads_pool_like_the_model():
    from earlyexit.heads import pool_vector

    builder, size = FAMILIES["timm.deit"]
    eem = ee.wrap(builder().eval(), input_size=size)
    layout = eem.layouts[0]
    assert layout.kind == "tokens" and layout.prefix_tokens == 2 and layout.token_pool == "cls"
    tokens = torch.randn(2, 18, 192)
    assert torch.equal(pool_vector(tokens, layout), tokens[:, 0])
    builder, size = FAMILIES["timm.swin"]
    assert ee.wrap(builder().eval(), input_size=size).layouts[0].kind == "nhwc"


def test_concurrent_calls_on_one_wrapper_do_not_mix_rows(resnet):
    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    eem.gate = ScriptedGate({0: {0, 2}, 1: {1}})
    eem.set_thresholds([0.5, 0.5, math.inf, math.inf])
    inputs = [batch(n=5, seed=s) for s in range(4)]
    expected = [eem.predict(x) for x in inputs]
    results: dict[int, list[ee.ExitResult]] = {i: [] for i in range(4)}

    def serve(i: int) -> None:
        for _ in range(3):
            results[i].append(eem.predict(inputs[i]))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for res in results[i]:
            assert torch.equal(res.exit_index, expected[i].exit_index)
            torch.testing.assert_close(res.logits, expected[i].logits, rtol=1e-5, atol=1e-5)


class _HalfGate(Gate):
    """Even caller rows pass every gate, odd rows none: a batch that splits at the first exit."""

    name = "half"

    def score(self, logits, ctx):
        return ((ctx.rows % 2) == 0).float()


def test_exit_indices_fall_back_where_nonzero_static_is_missing(resnet, monkeypatch):
    from earlyexit import exit_hooks as model_module

    eem = ee.wrap(resnet, input_size=(3, 64, 64))
    x = batch(n=8)
    eem.set_thresholds([0.5] + [math.inf] * (eem.num_exits - 1))
    eem.gate = _HalfGate()
    want = eem.predict(x)

    def missing(*args, **kwargs):
        raise NotImplementedError("no nonzero_static on this backend")

    monkeypatch.setattr(model_module, "_STATIC_NONZERO", {})
    monkeypatch.setattr(torch, "nonzero_static", missing)
    got = eem.predict(x)
    assert model_module._STATIC_NONZERO == {"cpu": False}
    assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.logits, want.logits)
    assert set(got.exit_index.tolist()) == {0, eem.num_exits}  # the batch really split


def test_wrapping_a_compiled_model_says_to_wrap_the_original(resnet):
    compiled = torch.compile(resnet)  # compiles lazily: nothing runs here
    with pytest.raises(ee.UnsupportedModelError, match=r"wrap the original model.*_orig_mod"):
        ee.wrap(compiled, input_size=(3, 64, 64))
    with pytest.raises(ee.UnsupportedModelError, match=r"torch\.compile"):
        ee.wrap(compiled, exits=["layer1"], input_size=(3, 64, 64))  # names skip the adapter
    assert ee.wrap(compiled._orig_mod, input_size=(3, 64, 64)).num_exits > 0


@pytest.mark.parametrize("exits", [4, 2.5, None, True])
def test_exits_that_are_not_auto_or_a_list_get_a_clear_error(resnet, exits):
    hint = "num_exits=4" if exits == 4 and exits is not True else "list of module names"
    with pytest.raises(ee.ConfigError, match=hint):
        ee.wrap(resnet, exits=exits)
