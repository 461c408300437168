"""Shared fixtures: small, randomly initialised members of every supported family.

The models keep the real architecture classes (so the family adapters are exercised) but shrink
width, depth or input size so the whole suite runs on a 2-core CPU. No weights are downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", category=UserWarning)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def _tv(builder: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, builder)(weights=None, num_classes=10, **kwargs)

    return build


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=64,
        patch_size=16,
        num_layers=4,
        num_heads=2,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )


def _tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=24,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 2, 4],
        window_size=[4, 4],
        num_classes=10,
    )


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    cfg = [
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 64, 1),
        CNBlockConfig(64, 96, 2),
        CNBlockConfig(96, None, 1),
    ]
    return ConvNeXt(cfg, num_classes=10)


def _tv_densenet() -> nn.Module:
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10)


#: family name -> (builder, input size the test feeds)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "timm.resnet": (_timm("resnet18"), (3, 64, 64)),
    "timm.resnet-d": (_timm("resnet10t"), (3, 64, 64)),
    "timm.vit": (_timm("vit_tiny_patch16_224", img_size=64, depth=4), (3, 64, 64)),
    "timm.deit": (_timm("deit_tiny_distilled_patch16_224", img_size=64, depth=4), (3, 64, 64)),
    "timm.convnext": (_timm("convnext_atto"), (3, 64, 64)),
    "timm.efficientnet": (_timm("efficientnet_b0"), (3, 64, 64)),
    "timm.mobilenetv3": (_timm("mobilenetv3_small_050"), (3, 64, 64)),
    "timm.regnet": (_timm("regnetx_002"), (3, 64, 64)),
    "timm.swin": (
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=64,
            window_size=4,
            embed_dim=24,
            depths=(1, 1, 2, 1),
            num_heads=(1, 2, 2, 4),
        ),
        (3, 64, 64),
    ),
    "torchvision.resnet": (_tv("resnet18"), (3, 64, 64)),
    "torchvision.vit": (_tv_vit, (3, 64, 64)),
    "torchvision.convnext": (_tv_convnext, (3, 64, 64)),
    "torchvision.efficientnet": (_tv("efficientnet_b0"), (3, 64, 64)),
    "torchvision.mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.5), (3, 64, 64)),
    "torchvision.mobilenet_v3": (_tv("mobilenet_v3_small"), (3, 64, 64)),
    "torchvision.swin": (_tv_swin, (3, 64, 64)),
    "torchvision.densenet": (_tv_densenet, (3, 64, 64)),
}


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request) -> tuple[str, nn.Module, tuple[int, int, int]]:
    """(family label, model in eval mode, input size) for every supported family."""
    torch.manual_seed(0)
    builder, size = FAMILIES[request.param]
    return request.param, builder().eval(), size


@pytest.fixture
def resnet() -> nn.Module:
    """A small timm resnet18 (10 classes) in eval mode."""
    torch.manual_seed(0)
    return FAMILIES["timm.resnet"][0]().eval()


def batch(size: tuple[int, int, int] = (3, 64, 64), n: int = 4, seed: int = 1) -> torch.Tensor:
    """A deterministic random batch."""
    return torch.randn(n, *size, generator=torch.Generator().manual_seed(seed))
