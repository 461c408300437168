"""HeadChooser: places and head kinds chosen per model on the first traffic (issue 14, item 5).

The real digits workload (a small CNN on scikit-learn's digits) is the traffic: its heads learn
enough in 1024 samples for some places to pay, so the choice is not trivial.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from earlyexit import ConfigError, DistillConfig, InputError, OnlineDistiller
from earlyexit.distill.head_choice import CHOOSE_EVERY, MIN_HELD_OUT, HeadChooser
from earlyexit.evaluation.pipeline import PipelineOptions, learn_online
from earlyexit.evaluation.stream import iterate_batches
from earlyexit.evaluation.workloads import load_workload


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    w = load_workload("digits", traffic_size=1200, eval_size=64, seed=0)
    w.model.eval()
    x = torch.cat([b for b, _ in iterate_batches(w.traffic, batch_size=256)])
    return w, x


def _chosen(w, x, samples=1024, seed=0, **kwargs):
    torch.manual_seed(seed)
    chooser = HeadChooser(
        w.model,
        samples=samples,
        config=DistillConfig(target_agreement=0.99, seed=seed),
        input_size=w.input_size,
        **kwargs,
    )
    served = []
    for start in range(0, x.shape[0], 64):
        batch = x[start : start + 64]
        served.append((batch, chooser.step(batch)))
        if chooser.done:
            break
    return chooser, served


@pytest.fixture(scope="module")
def chosen(digits):
    w, x = digits
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    chooser, served = _chosen(w, x)
    return w, chooser, served, before


def test_the_full_model_answers_while_choosing_and_is_untouched(chosen):
    w, chooser, served, before = chosen
    with torch.no_grad():
        for batch, logits in served:
            assert torch.equal(logits, w.model(batch))
    for k, v in w.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert chooser.done and chooser.choice.samples == 1024


def test_the_choice_is_a_local_optimum_of_the_priced_saving(chosen):
    _, chooser, _, _ = chosen
    choice = chooser.choice
    assert choice.held_out >= MIN_HELD_OUT
    best = chooser.expected_saving(choice.kinds)
    assert best == pytest.approx(choice.expected_mac_saving)
    assert best > 0.0  # the digits heads pay after 1024 samples
    # No single place changed to another option (off or another kind) saves more.
    for i in range(len(choice.places)):
        for option in (None, *chooser.kinds):
            trial = list(choice.kinds)
            trial[i] = option
            assert chooser.expected_saving(trial) <= best + 1e-12
    assert chooser.expected_saving([None] * len(choice.places)) == 0.0
    # Every uniform assignment is priced no better than the choice.
    for kind in chooser.kinds:
        assert chooser.expected_saving([kind] * len(choice.places)) <= best + 1e-12


def test_each_kind_learns_within_the_mac_budget_of_a_learner_of_its_own(chosen):
    _, chooser, _, _ = chosen
    choice = chooser.choice
    cfg = chooser.config
    share = cfg.closed_macs_budget * choice.served_macs
    for kind in chooser.kinds:
        assert 0 < chooser._learning_macs[kind] <= share
        assert choice.steps[kind] == chooser.trainers[kind].train_steps > 0
    assert choice.learning_macs == sum(chooser._learning_macs.values())
    # conv heads cost far more MACs per step, so within the same budget they take fewer steps
    assert choice.steps["conv"] < choice.steps["linear"]


def test_wrap_serves_the_chosen_heads_as_trained(chosen):
    w, chooser, served, _ = chosen
    eem = chooser.wrap()
    kept = chooser.choice.kept
    assert [e.name for e in eem.exits] == [place for place, _ in kept]
    assert list(eem.head_kinds) == [kind for _, kind in kept]
    assert all(t == float("inf") for t in eem.thresholds)  # every gate closed
    for head, (place, kind) in zip(eem.heads, kept, strict=True):
        trained = chooser.trainers[kind].student[chooser.places.index(place)]
        for a, b in zip(head.state_dict().values(), trained.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    batch = served[0][0]
    with torch.no_grad():
        assert torch.equal(eem(batch), w.model(batch))
    # Places switched off carry no head at all.
    dropped = [p for p, k in zip(chooser.choice.places, chooser.choice.kinds, strict=True) if not k]
    assert not set(dropped) & {e.name for e in eem.exits}


def test_same_seed_same_choice_and_heads(digits, chosen):
    w, x = digits
    _, first, _, _ = chosen
    again, _ = _chosen(w, x)
    assert again.choice.kinds == first.choice.kinds
    assert again.choice.expected_mac_saving == first.choice.expected_mac_saving
    for kind in first.kinds:
        for a, b in zip(
            first.trainers[kind].student.parameters(),
            again.trainers[kind].student.parameters(),
            strict=True,
        ):
            assert torch.equal(a, b)


def test_short_traffic_keeps_every_place_with_the_cheapest_kind(digits):
    w, x = digits
    chooser, _ = _chosen(w, x[:64], samples=1024)
    assert not chooser.done
    with pytest.raises(ConfigError, match="keep calling step"):
        chooser.wrap()
    choice = chooser.finish()
    assert choice.held_out < MIN_HELD_OUT
    assert choice.kinds == ("linear",) * len(choice.places)  # linear heads cost the fewest MACs
    assert "cheapest" in choice.reason
    assert len(chooser.wrap().heads) == len(choice.places)
    with pytest.raises(ConfigError, match="nothing is priced"):
        chooser.expected_saving(choice.kinds)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kinds": ()}, "at least one head kind"),
        ({"kinds": ("linear", "nope")}, "unknown head kind 'nope'"),
        ({"kinds": ("conv", "conv")}, "must not repeat"),
        ({"samples": 4}, "samples must be an int >= 8"),
        ({"samples": 100.0}, "samples must be an int >= 8"),
    ],
)
def test_bad_settings_are_refused(digits, kwargs, match):
    w, _ = digits
    with pytest.raises(ConfigError, match=match):
        HeadChooser(w.model, input_size=w.input_size, **kwargs)


def test_expected_saving_checks_the_assignment(chosen):
    _, chooser, _, _ = chosen
    with pytest.raises(ConfigError, match="one kind or None per candidate place"):
        chooser.expected_saving(["linear"])
    with pytest.raises(ConfigError, match="not a candidate kind"):
        chooser.expected_saving(["mlp"] * len(chooser.places))


def test_handover_carries_evidence_replay_and_optimizer_state(digits, chosen):
    w, chooser, _, _ = chosen
    _, x = digits
    seen = x[: chooser.choice.samples]
    eem = chooser.wrap()
    learner = OnlineDistiller(eem, chooser.config)
    # The chooser splits contents exactly as the learner will: held out there, held out here.
    side = chooser._split.is_calibration(seen)
    assert torch.equal(side, learner.split.is_calibration(seen))
    handover = chooser.handover()
    labels = handover.evidence_labels
    assert len(labels) + chooser.choice.held_out == int(side.sum())  # priced rows stay behind
    with torch.no_grad():
        answers = w.model(seen[side]).argmax(dim=1)
    unpriced = torch.arange(len(answers)) % CHOOSE_EVERY != 0
    assert torch.equal(labels, answers[unpriced])  # the held-out rows the choice did not price
    # Replay: every training row (the other contents), with the full model's logits.
    with torch.no_grad():
        assert torch.allclose(handover.replay_teacher, w.model(seen[~side]).float(), atol=1e-5)
    learner.take_over(handover)
    assert len(learner.evidence) == len(labels)
    assert len(learner.trainer.replay) == int((~side).sum())
    assert learner.trainer.credit == 0.0  # stored rows owe nothing: the heads trained on them
    # AdamW carries on: the learner's state is the chooser's, parameter by parameter.
    for j, (place, kind) in enumerate(chooser.choice.kept):
        source = chooser.trainers[kind]
        head = source.student[chooser.places.index(place)]
        pairs = zip(learner.trainer.student[j].parameters(), head.parameters(), strict=True)
        for mine, theirs in pairs:
            ours, original = learner.trainer.optimizer.state[mine], source.optimizer.state[theirs]
            assert torch.equal(ours["exp_avg_sq"], original["exp_avg_sq"])
            assert torch.equal(ours["step"], original["step"])
    with pytest.raises(InputError, match="before this learner serves"):
        learner.take_over(handover)


def _broken(field, change):
    def apply(h):
        return dataclasses.replace(h, **{field: change(getattr(h, field))})

    return apply


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        (_broken("evidence_z", lambda zs: zs[:-1]), "one feature tensor per exit"),
        (_broken("evidence_labels", lambda y: y.float()), "int64"),
        (_broken("evidence_labels", lambda y: y + 1000), "class indices"),
        (_broken("evidence_z", lambda zs: [z.clone().fill_(float("nan")) for z in zs]), "NaN"),
        (_broken("evidence_z", lambda zs: [z[:, :1] for z in zs]), "expected"),
        (_broken("replay_z", lambda zs: [z[:-1] for z in zs[:1]] + list(zs[1:])), "rows"),
        (_broken("replay_teacher", lambda t: t[:, :3]), "teacher logits"),
        (_broken("replay_teacher", lambda t: t * float("inf")), "finite"),
        (_broken("optimizer_states", lambda s: s[:1]), "one list per exit"),
        (
            _broken("optimizer_states", lambda s: [[{"step": 1}] * len(h) for h in s]),
            "AdamW state",
        ),
        (_broken("trained_samples", lambda n: 1.5), "trained_samples"),
    ],
)
def test_take_over_refuses_a_bad_handover_and_changes_nothing(chosen, broken, match):
    _, chooser, _, _ = chosen
    learner = OnlineDistiller(chooser.wrap(), chooser.config)
    with pytest.raises(InputError, match=match):
        learner.take_over(broken(chooser.handover()))
    assert len(learner.evidence) == 0 and learner.trainer.replay is None
    assert not learner.trainer.optimizer.state


@pytest.mark.slow
def test_learn_online_with_auto_heads_counts_the_choice_in_the_stream(digits):
    w, x = digits
    options = PipelineOptions(head="auto", choice_samples=512, batch_size=64, progress=False)
    run = learn_online(w.model, x, options, w.input_size)
    assert run.choice is not None and run.choice.samples == 512
    stats = run.stats
    assert stats["samples"] == x.shape[0]
    assert stats["learner_only"]["samples"] == x.shape[0] - 512
    cost = stats["learning_cost"]
    own = stats["learner_only"]["learning_cost"]
    assert cost["served_macs"] == own["served_macs"] + run.choice.served_macs
    assert cost["train_macs"] == own["train_macs"] + run.choice.learning_macs
    assert stats["head_choice"]["kinds"] == list(run.choice.kinds)
    assert stats["head_choice"]["evidence_handed_over"] > 0
    assert list(run.learner.eem.head_kinds) == [k for _, k in run.choice.kept]
