"""The one offline head-training loop (baselines and data maps both train through it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from earlyexit.distill.offline import fit_head, head_logits


class Classified(nn.Module):
    """An exit head shape: ``classify`` is what is trained on stored features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z) * 2.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # never used by the loop
        raise AssertionError("the loop must call classify")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(96, 4, generator=g)
    return z, (z[:, 0] > 0).long() + (z[:, 1] > 1).long()


def _fit(seed: int, epochs: int = 4, **kwargs) -> tuple[nn.Module, list[int]]:
    torch.manual_seed(0)
    head = Classified()
    seen: list[int] = []
    z, y = _data()
    fit_head(
        head,
        z,
        y,
        F.cross_entropy,
        epochs=epochs,
        lr=5e-2,
        batch_size=16,
        generator=torch.Generator().manual_seed(seed),
        after_epoch=seen.append,
        **kwargs,
    )
    return head, seen


def test_fit_head_learns_reproducibly_through_classify():
    z, y = _data()
    torch.manual_seed(0)
    with torch.no_grad():
        before = F.cross_entropy(head_logits(Classified(), z), y)
    head, seen = _fit(seed=1)
    assert seen == [0, 1, 2, 3]
    with torch.no_grad():
        after = F.cross_entropy(head_logits(head, z), y)
    assert float(after) < 0.5 * float(before)
    again, _ = _fit(seed=1)
    assert torch.equal(again.fc.weight, head.fc.weight)  # same generator, same head, bit for bit
    other, _ = _fit(seed=2)
    assert not torch.equal(other.fc.weight, head.fc.weight)  # the order really comes from it


def test_cosine_schedule_changes_the_steps_and_plain_modules_train_directly():
    plain, _ = _fit(seed=1)
    cosine, _ = _fit(seed=1, cosine_schedule=True)
    assert not torch.equal(plain.fc.weight, cosine.fc.weight)
    module = nn.Linear(4, 3)
    z, y = _data()
    fit_head(
        module,
        z,
        y,
        F.cross_entropy,
        epochs=1,
        lr=1e-2,
        batch_size=32,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(head_logits(module, z), module(z))
