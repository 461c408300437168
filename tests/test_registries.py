"""Gates, heads and backbone adapters follow one registry convention: a taken name is an error
unless ``overwrite=True``, an unknown name is a ConfigError that lists the known ones, and
registering from many threads at once loses nothing and lets exactly one claim a name."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import earlyexit as ee
from earlyexit.backbones import FeatureLayout
from earlyexit.errors import ConfigError
from earlyexit.gates import MarginGate, MaxSoftmaxGate, gate_names, make_gate
from earlyexit.heads import HeadSpec, build_head, head_kinds

SPEC = HeadSpec(
    channels=8, num_classes=3, layout=FeatureLayout("nchw"), feature_shape=(8, 4, 4), mac_budget=100
)


def _adapter(family: str) -> ee.BackboneAdapter:
    return ee.BackboneAdapter(family, lambda m: False, lambda n, m: False)


class _Kind:
    """One registry seen through its public functions, so every test runs on all three."""

    def __init__(
        self,
        name: str,
        builtin: str,
        register: Callable[..., object],
        unregister: Callable[[str], None],
        names: Callable[[], tuple[str, ...]],
        make_value: Callable[[str], object],
    ) -> None:
        self.name, self.builtin = name, builtin
        self.register, self.unregister, self.names = register, unregister, names
        self.make_value = make_value


KINDS = {
    "gate": _Kind(
        "gate",
        "max_softmax",
        lambda name, value, **kw: ee.register_gate(name, value, **kw),
        ee.unregister_gate,
        gate_names,
        lambda name: MarginGate,
    ),
    "head": _Kind(
        "head",
        "linear",
        lambda name, value, **kw: ee.register_head(name, value, **kw),
        ee.unregister_head,
        head_kinds,
        lambda name: lambda spec: nn.Linear(spec.channels, spec.num_classes),
    ),
    "adapter": _Kind(
        "adapter",
        "timm.resnet",
        lambda name, value, **kw: ee.register_adapter(value, **kw),
        ee.unregister_adapter,
        ee.supported_families,
        _adapter,
    ),
}


@pytest.fixture(params=sorted(KINDS))
def kind(request) -> _Kind:
    return KINDS[request.param]


def test_registering_a_taken_name_is_rejected(kind):
    before = kind.names()
    with pytest.raises(ConfigError, match="already registered; pass overwrite=True"):
        kind.register(kind.builtin, kind.make_value(kind.builtin))
    assert kind.names() == before  # the built-in is untouched

    kind.register("test.dup", kind.make_value("test.dup"))
    try:
        with pytest.raises(ConfigError, match=r"'test\.dup' is already registered"):
            kind.register("test.dup", kind.make_value("test.dup"))
    finally:
        kind.unregister("test.dup")
    assert "test.dup" not in kind.names()
    kind.unregister("test.dup")  # removing an absent name is allowed (clean-up never fails)


def test_overwrite_true_replaces_an_entry(kind):
    first, second = kind.make_value("test.over"), kind.make_value("test.over")
    kind.register("test.over", first)
    try:
        kind.register("test.over", second, overwrite=True)
        assert kind.names().count("test.over") == 1
    finally:
        kind.unregister("test.over")


def test_overwrite_changes_what_the_name_builds():
    ee.register_gate("test.swap", MaxSoftmaxGate)
    try:
        assert isinstance(make_gate("test.swap"), MaxSoftmaxGate)
        ee.register_gate("test.swap", MarginGate, overwrite=True)
        assert isinstance(make_gate("test.swap"), MarginGate)
    finally:
        ee.unregister_gate("test.swap")

    ee.register_head("test.swap", lambda s: nn.Linear(s.channels, s.num_classes))
    try:
        ee.register_head(
            "test.swap", lambda s: nn.Linear(s.channels, 2 * s.num_classes), overwrite=True
        )
        head = build_head("test.swap", SPEC)
        assert head(torch.randn(2, 8, 4, 4)).shape == (2, 6)
    finally:
        ee.unregister_head("test.swap")


def test_adapter_overwrite_puts_it_first_and_the_old_keyword_still_works():
    ee.register_adapter(_adapter("test.late"), first=False)
    try:
        assert ee.supported_families()[-1] == "test.late"
        ee.register_adapter(_adapter("test.late"), overwrite=True)
        assert ee.supported_families()[0] == "test.late"
        with pytest.warns(DeprecationWarning, match="first="):
            ee.register_adapter(_adapter("test.late"), overwrite=True, override=False)
        assert ee.supported_families()[-1] == "test.late"
    finally:
        ee.unregister_adapter("test.late")


def test_unknown_names_are_config_errors_listing_the_known_names():
    with pytest.raises(ConfigError) as err:
        make_gate("no_such_gate")
    assert "'no_such_gate'" in str(err.value) and "or pass a Gate object" in str(err.value)
    assert all(name in str(err.value) for name in gate_names())
    with pytest.raises(ConfigError, match=", ".join(gate_names())):
        make_gate({"name": "no_such_gate"})

    with pytest.raises(ConfigError) as err:
        build_head("no_such_head", SPEC)
    assert "'no_such_head'" in str(err.value) and ", ".join(head_kinds()) in str(err.value)

    # Adapters are found by what a model is, not by name: a model no family matches is an
    # UnsupportedModelError that lists every registered family.
    with pytest.raises(ee.UnsupportedModelError) as err:
        ee.wrap(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval(), input_size=(1, 2, 2))
    assert all(family in str(err.value) for family in ee.supported_families())


def test_names_must_be_non_empty_strings(kind):
    with pytest.raises(ConfigError, match="non-empty string"):
        kind.register("", kind.make_value(""))


def test_concurrent_registration_loses_nothing_and_one_thread_wins_a_name(kind):
    threads, per_thread = 8, 25
    start = threading.Barrier(threads)
    errors: list[BaseException] = []
    wins: list[int] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                kind.register(f"test.conc.{t}.{i}", kind.make_value(f"test.conc.{t}.{i}"))
                kind.names()  # reading while others write must not fail
            try:
                kind.register("test.conc.shared", kind.make_value("test.conc.shared"))
            except ConfigError:
                return
            with lock:
                wins.append(t)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    try:
        assert not errors, errors
        assert len(wins) == 1
        registered = set(kind.names())
        assert {
            f"test.conc.{t}.{i}" for t in range(threads) for i in range(per_thread)
        } <= registered
    finally:
        for t in range(threads):
            for i in range(per_thread):
                kind.unregister(f"test.conc.{t}.{i}")
        kind.unregister("test.conc.shared")
    assert not any(name.startswith("test.conc.") for name in kind.names())
