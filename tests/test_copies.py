"""Copies of a wrapper: deepcopy, pickle and torch.save give an independent, identical wrapper;
torch.jit is refused with one clear error."""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle

import pytest
import torch
from conftest import batch
from torch import nn

import earlyexit as ee
from earlyexit.exit_hooks import ExitHook

SIZE = (3, 64, 64)


def _exit_hooks(model: nn.Module) -> list[ExitHook]:
    return [
        h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, ExitHook)
    ]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture
def eem(resnet):
    """A wrapper whose thresholds send some rows out at every exit (upper quartiles of its scores)."""
    wrapped = ee.wrap(resnet, input_size=SIZE, supervisor="max_softmax")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # new heads answer zeros: give them something to be confident about
        for p in wrapped.heads.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    _, trace = wrapped.trace(batch(SIZE, n=16))
    thresholds = [float(r.scores.quantile(0.75)) for r in trace.exits]
    wrapped.set_thresholds([*thresholds[:-1], math.inf])  # the last closed: some rows run on
    return wrapped


def _assert_serves_alike(a: ee.EarlyExitModel, b: ee.EarlyExitModel) -> None:
    x = batch(SIZE, n=16, seed=3)
    ra, rb = a.predict(x), b.predict(x)
    assert 0 < int((ra.exit_index < a.num_exits).sum()) < 16  # some early, some to the end
    for name in ("logits", "exit_index", "confidence", "accepted"):
        assert torch.equal(getattr(ra, name), getattr(rb, name)), name


def _pickled(eem: ee.EarlyExitModel) -> ee.EarlyExitModel:
    return pickle.loads(pickle.dumps(eem))


def _torch_saved(eem: ee.EarlyExitModel) -> ee.EarlyExitModel:
    buffer = io.BytesIO()
    torch.save(eem, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole object: only for trusted files


@pytest.mark.parametrize("make_copy", [copy.deepcopy, _pickled, _torch_saved])
def test_a_copy_serves_identically_on_its_own_base_model(eem, make_copy):
    twin = make_copy(eem)
    assert type(twin) is ee.EarlyExitModel
    assert twin.base_model is not eem.base_model
    assert twin.thresholds == eem.thresholds and twin.exits == eem.exits
    assert type(twin.supervisor) is type(eem.supervisor)
    _assert_serves_alike(eem, twin)
    # Exactly its own hooks on its own base model; the original's are untouched and not copied.
    assert [h.runtime for h in _exit_hooks(twin.base_model)] == [twin._runtime] * twin.num_exits
    assert [h.runtime for h in _exit_hooks(eem.base_model)] == [eem._runtime] * eem.num_exits
    assert _hook_count(twin.base_model) == twin.num_exits


def test_a_deepcopy_is_independent_of_the_original(eem):
    twin = copy.deepcopy(eem)
    x = batch(SIZE, n=16, seed=3)
    before = eem.predict(x)

    # Its heads, thresholds and base model are its own.
    with torch.no_grad():
        for p in twin.heads.parameters():
            p.add_(1.0)
        for p in twin.base_model.parameters():
            p.mul_(0.5)
    twin.set_thresholds([-math.inf] * twin.num_exits)
    assert torch.equal(twin.predict(x).exit_index, torch.zeros(16, dtype=torch.long))
    after = eem.predict(x)
    assert torch.equal(after.logits, before.logits)
    assert torch.equal(after.exit_index, before.exit_index)

    # Removing one's hooks leaves the other's in place, both ways.
    twin.remove()
    assert _hook_count(twin.base_model) == 0 and _hook_count(eem.base_model) == eem.num_exits
    assert torch.equal(eem.predict(x).exit_index, before.exit_index)
    other = copy.deepcopy(eem)
    eem.remove()
    assert _hook_count(other.base_model) == other.num_exits
    assert torch.equal(other.predict(x).exit_index, before.exit_index)
    with pytest.raises(RuntimeError, match="removed"):
        eem.predict(x)


def test_a_copy_of_a_removed_wrapper_is_removed_and_copies_are_garbage_collected(eem):
    twin = copy.deepcopy(eem)
    base = twin.base_model
    del twin
    gc.collect()
    assert _hook_count(base) == 0  # the copy's hooks went with it

    eem.remove()
    removed = copy.deepcopy(eem)
    assert _hook_count(removed.base_model) == 0
    with pytest.raises(RuntimeError, match="removed"):
        removed.predict(batch(SIZE))


def test_other_wrappers_hooks_are_not_carried_into_a_copy(resnet):
    first = ee.wrap(resnet, input_size=SIZE)
    second = ee.wrap(resnet, input_size=SIZE, exits=[0])
    assert _hook_count(resnet) == first.num_exits + second.num_exits
    twin = copy.deepcopy(first)
    assert _hook_count(twin.base_model) == first.num_exits
    # A base model copied on its own carries inert hooks; wrapping the copy strips them.
    model_copy = copy.deepcopy(resnet)
    torch.testing.assert_close(model_copy(batch(SIZE)), resnet(batch(SIZE)), rtol=0, atol=0)
    rewrapped = ee.wrap(model_copy, input_size=SIZE, exits=[0])
    assert _hook_count(model_copy) == 1 and _exit_hooks(model_copy)[0].runtime is rewrapped._runtime


def test_a_wrapped_base_model_can_be_saved_with_torch_save(eem, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(eem.base_model, path)
    loaded = torch.load(path, weights_only=False)
    x = batch(SIZE)
    torch.testing.assert_close(loaded(x), eem.base_model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "capture",
    [
        lambda eem: torch.jit.script(eem),
        lambda eem: torch.jit.trace(eem, batch(SIZE)),
        lambda eem: torch.jit.trace(lambda x: eem.predict(x).logits, batch(SIZE)),
    ],
    ids=["script", "trace", "trace-predict"],
)
def test_torch_jit_is_refused_with_what_to_do(eem, capture):
    with pytest.raises(ee.UnsupportedModelError, match=r"eem\.save\(path\).*eem\.base_model"):
        capture(eem)
    _assert_serves_alike(eem, copy.deepcopy(eem))  # still serves
