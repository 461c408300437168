"""The "textures" workloads: which photograph is this small patch from? A ResNet and a ViT.

The source is the 16 real photographs bundled with scikit-image (nothing is downloaded): each one
is a class. A sample is a small square patch of one photograph, rendered at the model's resolution
(32x32 for the ResNet, 48x48 for the ViT) with per-sample difficulty. Patches of textures (brick,
grass, gravel), of text (page, text), of microscopy and space images and of scenes make some
classes easy to tell apart and some pairs hard; flat regions are avoided (see below), but a small
blurred, noisy, low-contrast patch can still be ambiguous, which is what early exit needs.

Splits never share a pixel. Every photograph (its shorter side scaled to 320 pixels) is cut into
a grid of 64x64 tiles; a fixed partition (the same for every seed) gives 60% of each photograph's
tiles to ``"train"``, 20% to ``"traffic"`` and 20% to ``"evaluation"``, and a patch, rotation margin
included, always lies inside one tile of its split. Tiles of all three splits are spread over the
whole photograph, so the splits see the same kinds of content.

A sample is drawn from a generator seeded by ``(seed, split, index)``, so it is the same on every
call and at every resolution (the ResNet and the ViT see the same view, resampled), and rendering
is lazy (numpy/scipy/PIL only; ~0.3 ms a patch). One latent ``difficulty`` d ~ Beta(a, b) per sample
scales every nuisance: patch size spread (smaller = less context), rotation (any of the 8 flips and
quarter turns, plus sd 4 + 26 d degrees), loss of contrast, brightness, saturation, greyscale
(probability 0.1 + 0.4 d), colour tint, Gaussian blur and pixel noise. :meth:`TextureViews.describe`
reports the draws.
"""

from __future__ import annotations

import json
import math
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..._optional import import_demo_package
from ._fp16 import as_fp32, save_fp16_checkpoint

__all__ = [
    "TEXTURE_CLASSES",
    "TEXTURE_DIFFICULTY",
    "TEXTURE_MODELS",
    "TEXTURE_SPLITS",
    "TEXTURE_TRAIN_DIFFICULTY",
    "TextureModel",
    "TextureViews",
    "build_texture_backbone",
    "load_texture_backbone",
    "save_texture_backbone",
    "texture_record",
    "texture_tiles",
    "train_texture_backbone",
]

#: The classes: scikit-image ``skimage.data`` names (``motorcycle`` is the left image of
#: ``stereo_motorcycle()``). Left out of the 18 bundled photographs: ``cell`` (mostly an even grey
#: background) and ``clock`` (a plain wall and a motion-blurred clock).
TEXTURE_CLASSES: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "motorcycle",
    "page",
    "retina",
    "rocket",
    "text",
)

#: Splits and the fraction of each photograph's tiles each owns.
TEXTURE_SPLITS: dict[str, float] = {"train": 0.6, "traffic": 0.2, "evaluation": 0.2}
_SPLIT_CODES = {"train": 21, "traffic": 22, "evaluation": 23}
# Fixed, not tied to `seed`: the shipped backbones were trained on this train split, and a seed
# must never move a training tile into the evaluation split.
_PARTITION_SEED = 20_261_207

#: Beta(a, b) of the per-sample difficulty of served traffic and evaluation (mean 0.25) ...
TEXTURE_DIFFICULTY = (1.0, 3.0)
#: ... and of the training renders (mean 0.33): trained on harder samples than served, as digits.
TEXTURE_TRAIN_DIFFICULTY = (1.1, 2.2)

_SHORT_SIDE = 320  # every photograph is scaled to this shorter side once (5 tiles)
_TILE = 64  # split granularity in scaled pixels: a patch plus its rotation margin fits in a tile
_BASE_PATCH = 30.0  # median patch side in scaled pixels
_MIN_PATCH, _MAX_PATCH = 14.0, 43.0  # 43 * sqrt(2) + 2 < 64: any rotation fits the tile
_MIN_STD = 0.04  # a patch flatter than this (grey std in [0, 1]) is redrawn, up to 8 times
_MEAN, _STD = 0.5, 0.5  # images are normalised to [-1, 1]


@cache
def _photo(name: str) -> np.ndarray:
    """A bundled photograph as float32 [H, W, 3] in [0, 1], shorter side scaled to 320 (cached)."""
    data = import_demo_package("skimage.data", "the textures workloads")
    array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    image = Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8), "RGB")
    scale = _SHORT_SIDE / min(image.size)
    size = (
        max(_SHORT_SIDE, round(image.width * scale)),
        max(_SHORT_SIDE, round(image.height * scale)),
    )
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(image, dtype=np.float32) / 255.0


@cache
def texture_tiles(split: str) -> tuple[np.ndarray, ...]:
    """Per class, the ``[n, 2]`` (row, col) top-left corners of the 64x64 tiles owned by ``split``.

    The three splits partition each photograph's tiles, so no pixel is shared between them.

    Example:
        >>> train, evaluation = texture_tiles("train"), texture_tiles("evaluation")
        >>> len(train) == len(TEXTURE_CLASSES)
        True
        >>> set(map(tuple, train[0])) & set(map(tuple, evaluation[0]))
        set()
    """
    if split not in TEXTURE_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(TEXTURE_SPLITS)}")
    out = []
    for k, name in enumerate(TEXTURE_CLASSES):
        height, width = _photo(name).shape[:2]
        corners = np.array(
            [
                (r, c)
                for r in range(0, height - _TILE + 1, _TILE)
                for c in range(0, width - _TILE + 1, _TILE)
            ]
        )
        order = np.random.default_rng([_PARTITION_SEED, k]).permutation(len(corners))
        bounds = np.cumsum([0.0, *TEXTURE_SPLITS.values()])
        i = list(TEXTURE_SPLITS).index(split)
        start, stop = round(bounds[i] * len(corners)), round(bounds[i + 1] * len(corners))
        out.append(corners[np.sort(order[start:stop])])
    return tuple(out)


class TextureViews(torch.utils.data.Dataset):
    """Labelled patches of scikit-image's photographs, one class per photograph; lazy, deterministic.

    Sample ``i``: a class drawn uniformly, a tile of that photograph in ``split``, a patch inside
    it and its nuisances, all from a generator seeded by ``(seed, split, i)``. Yields
    ``(image, label)``: a float32 ``[3, side, side]`` tensor in [-1, 1] and an int in 0..15
    (an index into :data:`TEXTURE_CLASSES`). ``side`` only changes the resampling: sample ``i``
    is the same view at 32 and at 48 pixels.

    Args:
        split: ``"train"``, ``"traffic"`` or ``"evaluation"`` (disjoint tiles).
        size: number of samples.
        seed: varies every sample, never the partition into splits.
        side: output resolution in pixels.
        difficulty: ``(a, b)`` of the Beta distribution the per-sample difficulty is drawn from.

    Example:
        >>> data = TextureViews("evaluation", size=4, side=32)
        >>> image, label = data[0]
        >>> tuple(image.shape), image.dtype, TEXTURE_CLASSES[label] in TEXTURE_CLASSES
        ((3, 32, 32), torch.float32, True)
    """

    def __init__(
        self,
        split: str,
        *,
        size: int,
        seed: int = 0,
        side: int = 32,
        difficulty: tuple[float, float] = TEXTURE_DIFFICULTY,
    ) -> None:
        if split not in TEXTURE_SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(TEXTURE_SPLITS)}")
        if len(difficulty) != 2 or min(difficulty) <= 0:
            raise ValueError(f"difficulty must be Beta parameters (a, b) > 0, got {difficulty}")
        if int(size) < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if int(side) < 8:
            raise ValueError(f"side must be >= 8 pixels, got {side}")
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.side = int(side)
        self.difficulty = (float(difficulty[0]), float(difficulty[1]))

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range for {self.size} samples")
        return np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])

    def label(self, index: int) -> int:
        """The class of sample ``index`` without rendering it (the generator's first draw)."""
        return int(self._rng(index).integers(len(TEXTURE_CLASSES)))

    @property
    def labels(self) -> torch.Tensor:
        """All labels, ``[size]`` int64, without rendering."""
        return torch.tensor([self.label(i) for i in range(self.size)], dtype=torch.int64)

    def describe(self, index: int) -> dict[str, Any]:
        """The drawn parameters of sample ``index`` (``label`` and ``difficulty`` first)."""
        rng = self._rng(index)
        label = int(rng.integers(len(TEXTURE_CLASSES)))
        d = float(rng.beta(*self.difficulty))
        photo = _photo(TEXTURE_CLASSES[label])
        tiles = texture_tiles(self.split)[label]
        for _ in range(8):  # redraw flat patches (sky, black space): nothing there to classify
            tile = tiles[rng.integers(len(tiles))]
            side = float(
                np.clip(
                    _BASE_PATCH * math.exp(rng.normal(0.0, 0.1 + 0.3 * d)), _MIN_PATCH, _MAX_PATCH
                )
            )
            angle = float(rng.normal(0.0, 4.0 + 26.0 * d))
            rad = math.radians(angle)
            # half the rotated square's bounding box, plus a pixel of resampling support
            reach = min(side * (abs(math.cos(rad)) + abs(math.sin(rad))) / 2 + 1.0, _TILE / 2)
            centre = (
                float(tile[0] + rng.uniform(reach, _TILE - reach)),
                float(tile[1] + rng.uniform(reach, _TILE - reach)),
            )
            r0, c0 = round(centre[0] - side / 2), round(centre[1] - side / 2)
            s = round(side)
            window = photo[max(r0, 0) : r0 + s, max(c0, 0) : c0 + s].mean(-1)
            if window.std() >= _MIN_STD:
                break
        return {
            "label": label,
            "difficulty": d,
            "tile": (int(tile[0]), int(tile[1])),
            "centre": centre,  # (row, col) in the scaled photograph
            "patch": side,  # side in scaled pixels
            "angle": angle,  # degrees
            "dihedral": int(rng.integers(8)),  # flip (bit 2) and quarter turns (bits 0-1)
            "brightness": float(math.exp(rng.normal(0.0, 0.05 + 0.25 * d))),
            "contrast": float(
                np.clip(
                    math.exp(rng.normal(0.0, 0.1 + 0.2 * d)) - d * rng.uniform(0, 0.7), 0.2, 2.0
                )
            ),
            "saturation": float(math.exp(rng.normal(0.0, 0.15 + 0.5 * d))),
            "grey": bool(rng.random() < 0.1 + 0.4 * d),
            "tint": [float(v) for v in rng.uniform(-1.0, 1.0, size=3) * (0.02 + 0.12 * d)],
            "blur_sigma": float(d * rng.uniform(0.0, 1.5)),  # in output pixels at 32x32
            "noise_sigma": float(rng.uniform(0.0, 0.01 + 0.15 * d)),
            "noise_seed": int(rng.integers(2**31)),
        }

    def render(self, index: int) -> np.ndarray:
        """Sample ``index`` as a float32 ``[3, side, side]`` array in [0, 1] (before normalising)."""
        from scipy.ndimage import gaussian_filter

        p = self.describe(index)
        photo = _photo(TEXTURE_CLASSES[p["label"]])
        # rotate the patch's own tile about the patch centre, then resample the patch square:
        # `describe` keeps the rotated square (plus a pixel) inside the tile, so no pixel of
        # another tile (another split) is read
        tr, tc = p["tile"]
        tile = photo[tr : tr + _TILE, tc : tc + _TILE]
        cy, cx = p["centre"][0] - tr, p["centre"][1] - tc
        image = Image.fromarray(np.round(tile * 255).astype(np.uint8), "RGB")
        image = image.rotate(p["angle"], resample=Image.Resampling.BILINEAR, center=(cx, cy))
        half = p["patch"] / 2
        image = image.resize(
            (self.side, self.side),
            Image.Resampling.BILINEAR,
            box=(cx - half, cy - half, cx + half, cy + half),
        )
        x = np.asarray(image, dtype=np.float32) / 255.0  # [side, side, 3]
        x = np.rot90(x, p["dihedral"] & 3)
        if p["dihedral"] & 4:
            x = x[:, ::-1]
        grey = x.mean(-1, keepdims=True)
        x = grey + p["saturation"] * (x - grey)
        if p["grey"]:
            x = np.broadcast_to(x.mean(-1, keepdims=True), x.shape)
        x = x.mean() + p["contrast"] * (x - x.mean())
        x = x * p["brightness"] + np.asarray(p["tint"], dtype=np.float32)
        x = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
        sigma = p["blur_sigma"] * self.side / 32
        if sigma > 0.05:
            x = gaussian_filter(x, sigma=(0.0, sigma, sigma))
        noise = np.random.default_rng(p["noise_seed"]).standard_normal(x.shape)
        x = x + p["noise_sigma"] * noise
        return np.clip(x, 0.0, 1.0).astype(np.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += self.size
        image = (self.render(index) - _MEAN) / _STD
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), self.label(index)


# ---------------------------------------------------------------- the two reference backbones


class TextureModel:
    """One reference backbone of the textures workloads: how to build it and where it is shipped.

    Attributes:
        name: the workload name (``"textures_resnet"`` or ``"textures_vit"``).
        arch: a short description of the architecture for reports.
        side: the input resolution (``input_size`` is ``(3, side, side)``).
        checkpoint: the shipped fp16 safetensors file; ``record`` is the JSON next to it.
    """

    def __init__(self, name: str, arch: str, side: int, stem: str) -> None:
        self.name = name
        self.arch = arch
        self.side = side
        self.checkpoint = Path(__file__).with_name(f"{stem}.safetensors")
        self.record = Path(__file__).with_name(f"{stem}.json")

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.side, self.side)

    def __repr__(self) -> str:
        return f"TextureModel({self.name!r}, {self.arch!r}, side={self.side})"


#: The two backbones, by workload name. The ResNet is timm's ResNet-18 at half width (channels
#: 32-64-128-256, 2.8 M parameters, 5.6 MB in fp16) without the stem's max-pool, so a 32x32 input
#: keeps 16x16 maps in the first stage; the ViT is a timm ``VisionTransformer`` for 48x48 inputs:
#: 8x8 patches (36 tokens + a class token), width 128, depth 6, 4 heads, MLP ratio 3, average
#: pooling of the patch tokens (1.0 M parameters).
TEXTURE_MODELS: dict[str, TextureModel] = {
    "textures_resnet": TextureModel(
        "textures_resnet",
        "timm resnet18 at half width (32-64-128-256), no stem max-pool",
        32,
        "textures_resnet18_half",
    ),
    "textures_vit": TextureModel(
        "textures_vit",
        "timm VisionTransformer 48x48, patch 8, width 128, depth 6, 4 heads",
        48,
        "textures_vit_tiny",
    ),
}


def _spec(name: str) -> TextureModel:
    if name not in TEXTURE_MODELS:
        raise ValueError(
            f"unknown textures model {name!r}; choose from {', '.join(TEXTURE_MODELS)}"
        )
    return TEXTURE_MODELS[name]


def build_texture_backbone(name: str) -> torch.nn.Module:
    """An untrained backbone of textures workload ``name`` (16 classes), seeded by the caller.

    Example:
        >>> model = build_texture_backbone("textures_vit")
        >>> tuple(model(torch.zeros(2, 3, 48, 48)).shape)
        (2, 16)
    """
    spec = _spec(name)  # a bad name fails before the slow timm import
    import timm
    from timm.models.vision_transformer import VisionTransformer

    classes = len(TEXTURE_CLASSES)
    if name == "textures_resnet":
        model = timm.create_model(
            "resnet18", pretrained=False, num_classes=classes, channels=(32, 64, 128, 256)
        )
        model.maxpool = torch.nn.Identity()  # 32x32 input: keep 16x16 maps after the stem
        return model
    return VisionTransformer(
        img_size=spec.side,
        patch_size=8,
        embed_dim=128,
        depth=6,
        num_heads=4,
        mlp_ratio=3.0,
        num_classes=classes,
        global_pool="avg",
    )


def save_texture_backbone(name: str, model: torch.nn.Module, path: str | Path | None = None) -> str:
    """Write ``model``'s weights as fp16 safetensors (default: the shipped file). Returns sha256."""
    spec = _spec(name)
    return save_fp16_checkpoint(model, path or spec.checkpoint, arch=spec.arch)


def load_texture_backbone(name: str, path: str | Path | None = None) -> torch.nn.Module:
    """The trained backbone of textures workload ``name``: eval mode, CPU, fp32.

    Example:
        >>> model = load_texture_backbone("textures_resnet")
        >>> image, label = TextureViews("evaluation", size=1, side=32)[0]
        >>> model(image[None]).shape
        torch.Size([1, 16])
    """
    from safetensors.torch import load_file

    from ._fashion import ShippedFileError

    spec = _spec(name)
    path = Path(path) if path is not None else spec.checkpoint
    if not path.is_file():
        raise ShippedFileError(
            f"no {name} checkpoint at {path}; reinstall earlyexit, or train one with "
            "`python scripts/train_reference_backbone.py --workload " + name + "`"
        )
    model = build_texture_backbone(name)
    model.load_state_dict(as_fp32(load_file(path)), strict=True)
    return model.eval()


def texture_record(name: str) -> dict[str, Any]:
    """The training record shipped next to the checkpoint of ``name`` (recipe and accuracy)."""
    return json.loads(_spec(name).record.read_text())


def train_texture_backbone(
    name: str,
    *,
    samples: int = 60_000,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    seed: int = 0,
    init: str | Path | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train backbone ``name`` on fresh renders of the train split; returns ``(model, recipe)``.

    One pass over ``samples`` renders (each a new draw, so none is seen twice) at the model's
    resolution with the harder training difficulty, AdamW with a one-cycle cosine schedule and
    label smoothing. Reproducible: torch is seeded and renders are deterministic. ``init``: a
    checkpoint of the same backbone to continue from (a second round gets ``seed`` + 1 so its
    renders are new ones); its path is recorded.

    Example:
        >>> model, recipe = train_texture_backbone("textures_resnet", samples=64, progress=False)
        >>> recipe["steps"]
        1
    """
    from tqdm.auto import tqdm

    spec = _spec(name)
    torch.manual_seed(seed)
    model = build_texture_backbone(name) if init is None else load_texture_backbone(name, init)
    model.train()
    data = TextureViews(
        "train", size=samples, seed=seed, side=spec.side, difficulty=TEXTURE_TRAIN_DIFFICULTY
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=len(loader), pct_start=0.05
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"training {name}", disable=not progress, mininterval=30)
    for images, labels in bar:
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    recipe = {
        "arch": spec.arch,
        "num_classes": len(TEXTURE_CLASSES),
        "input_size": list(spec.input_size),
        "train_difficulty_beta": list(TEXTURE_TRAIN_DIFFICULTY),
        "train_samples": len(loader) * batch_size,
        "steps": len(loader),
        "batch_size": batch_size,
        "optimizer": f"AdamW(lr={lr}, weight_decay={weight_decay})",
        "schedule": "OneCycleLR(pct_start=0.05, cosine)",
        "label_smoothing": label_smoothing,
        "seed": seed,
        "init": None if init is None else Path(init).name,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return model, recipe
