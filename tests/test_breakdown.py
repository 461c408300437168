"""Per-exit MAC table of wrapped models: dispatch counter vs fvcore vs FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import earlyexit as ee
from earlyexit.costs.macs import MacCounter
from earlyexit.evaluation.breakdown import mac_breakdown

# Families whose blocks are plain convolutions / matmuls / SDPA, covering CNN, ViT and Swin.
CHECKED = ["timm.resnet", "timm.vit", "timm.swin", "torchvision.vit", "torchvision.convnext"]


def _wrapped(family: str, head: str = "mlp") -> ee.EarlyExitModel:
    torch.manual_seed(0)
    builder, size = FAMILIES[family]
    return ee.wrap(builder().eval(), input_size=size, head=head)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_table_matches_the_wrappers_exit_points(family):
    eem = _wrapped(family)
    table = mac_breakdown(eem)
    assert [r.name for r in table.rows] == [e.name for e in eem.exits] + ["final"]
    assert [r.cumulative_macs for r in table.rows[:-1]] == [e.macs for e in eem.exits]
    assert [r.head_macs for r in table.rows[:-1]] == list(eem.head_macs)
    assert table.base_macs == eem.base_macs
    assert table.rows[-1].cumulative_macs == eem.base_macs + sum(eem.head_macs)
    assert table.head_overhead == pytest.approx(sum(eem.head_macs) / eem.base_macs)
    fractions = [r.fraction for r in table.rows]
    assert fractions == sorted(fractions)


@pytest.mark.parametrize(
    "family",
    [
        f
        if f in ("timm.resnet", "timm.vit", "torchvision.vit")
        else pytest.param(f, marks=pytest.mark.slow)
        for f in sorted(FAMILIES)
    ],
)  # fvcore jit-traces each model: seconds each on 2 loaded cores, so most families run as slow
def test_fvcore_attribution_equals_dispatch_counter(family):
    eem = _wrapped(family)
    dispatch = mac_breakdown(eem, method="dispatch")
    fv = mac_breakdown(eem, method="fvcore")
    assert [r.backbone_macs for r in fv.rows] == [r.backbone_macs for r in dispatch.rows]
    assert [r.head_macs for r in fv.rows] == [r.head_macs for r in dispatch.rows]
    assert fv.unsupported_ops == {}


# Ops torch's FlopCounterMode has no formula for (macs.py adds them): the fused attention paths.
FUSED = ("aten._native_multi_head_attention", "aten._scaled_dot_product_flash_attention_for_cpu")


@pytest.mark.parametrize("family", CHECKED)
def test_cross_check_against_flop_counter_mode(family):
    """torch's own FlopCounterMode, read when each exit module finishes, gives the same prefix
    MACs (FLOPs / 2), up to exactly the fused attention ops it cannot count (timm ViT's CPU flash
    SDPA, torchvision ViT's nn.MultiheadAttention fast path), which MacCounter books per op."""
    eem = _wrapped(family)
    table = mac_breakdown(eem)
    model = eem.base_model
    mode = FlopCounterMode(display=False)
    counter = MacCounter()
    seen: dict[str, tuple[int, int]] = {}
    feats: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            fused = sum(counter.by_op.get(op, 0) for op in FUSED)
            seen.setdefault(name, (mode.get_total_flops() // 2, fused))
            feats.setdefault(name, output)

        return hook

    handles = [
        model.get_submodule(e.name).register_forward_hook(hook_for(e.name)) for e in eem.exits
    ]
    try:
        with torch.no_grad(), mode, counter:
            model(torch.zeros(1, *eem.input_size))
    finally:
        for h in handles:
            h.remove()
    for row in table.rows[:-1]:
        flops_half, fused = seen[row.name]
        assert flops_half + fused == row.backbone_macs
    fused_total = sum(counter.by_op.get(op, 0) for op in FUSED)
    assert mode.get_total_flops() // 2 + fused_total == table.base_macs
    if family.endswith("vit"):
        assert fused_total > 0  # the check above really exercised the attention gap
    for head, row in zip(eem.heads, table.rows, strict=False):
        head_mode = FlopCounterMode(display=False)
        with torch.no_grad(), head_mode:
            head(feats[row.name])
        assert head_mode.get_total_flops() // 2 == row.head_macs


def test_unsupported_ops_are_reported_not_dropped():
    class Spectral(nn.Module):
        def forward(self, x):
            return torch.fft.rfft2(x).abs().mean(dim=(-1, -2))[:, :2]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3)
            self.body = Spectral()
            self.fc = nn.Linear(2, 4)

        def forward(self, x):
            return self.fc(self.body(self.stem(x)))

    eem = ee.wrap(Net().eval(), exits=["stem"], input_size=(3, 8, 8))
    table = mac_breakdown(eem)
    assert "aten._fft_r2c" in table.unsupported_ops
    assert "Not counted" in table.to_markdown()


def test_markdown_and_dict():
    eem = _wrapped("timm.resnet", head="linear")
    table = mac_breakdown(eem)
    md = table.to_markdown()
    assert md.count("\n|") == len(table.rows) + 1  # header rule + one line per row
    assert "final" in md and "of base" in md
    d = table.to_dict()
    assert d["base_macs"] == eem.base_macs and len(d["rows"]) == eem.num_exits + 1
    with pytest.raises(ValueError):
        mac_breakdown(eem, method="guess")
