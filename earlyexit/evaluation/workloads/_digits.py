"""The "digits" workload: a labelled stream rendered from scikit-learn's bundled handwritten digits.

Each of the 1797 8x8 digits of ``sklearn.datasets.load_digits`` belongs to exactly one split
(train / traffic / evaluation), fixed once for all seeds so that the shipped reference backbone
never saw a source image of the other two. A sample is rendered on demand into a 3x64x64 colour
image whose difficulty is drawn per sample: the digit's position, scale, rotation, shear, contrast,
colour tint, blur, noise and background clutter (fragments of other digits of the same split) all
grow with one latent ``difficulty`` in [0, 1] that :meth:`DigitImages.describe` reports.

Rendering uses numpy/scipy only, from a generator seeded by ``(seed, split, index)``: the same
sample on every call, no global random state touched, cheap enough to render during training.
"""

from __future__ import annotations

import json
import math
import time
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._optional import import_demo_package
from ._fp16 import as_fp32, save_fp16_checkpoint

__all__ = [
    "DIGITS_ARCH",
    "DIGITS_CHECKPOINT",
    "DIGITS_DIFFICULTY",
    "DIGITS_INPUT_SIZE",
    "DIGITS_RECORD",
    "DIGITS_SPLITS",
    "DIGITS_TRAIN_DIFFICULTY",
    "DigitImages",
    "build_digits_backbone",
    "digit_split_sources",
    "evaluate_accuracy",
    "load_digits_backbone",
    "save_digits_backbone",
    "train_digits_backbone",
]

#: The reference backbone: timm's RegNetY-200MF, unchanged but for 10 classes (stem + 4 stages).
DIGITS_ARCH = "regnety_002"
#: Input of the digits workload: small enough for 2 CPU cores, large enough for 4 stages.
DIGITS_INPUT_SIZE = (3, 64, 64)
#: Shipped checkpoint (fp16 safetensors) and its training record, next to this module.
DIGITS_CHECKPOINT = Path(__file__).with_name("digits_regnety_002.safetensors")
DIGITS_RECORD = Path(__file__).with_name("digits_regnety_002.json")

#: Splits and the fraction of source images each owns.
DIGITS_SPLITS: dict[str, float] = {"train": 0.6, "traffic": 0.2, "evaluation": 0.2}
_SPLIT_CODES = {"train": 11, "traffic": 12, "evaluation": 13}
# The partition of source images is fixed (not tied to `seed`): the shipped backbone was trained
# on this train split, and a seed must never move a training image into the evaluation split.
_PARTITION_SEED = 20_240_611

#: Beta(a, b) of the per-sample difficulty of served traffic and evaluation (mean 0.25) ...
DIGITS_DIFFICULTY = (1.0, 3.0)
#: ... and of the training renders (mean 0.33): the backbone is trained on harder samples than
#: it serves, a usual augmentation choice, which puts its accuracy in the 93-98% band the
#: workload aims for (trained and served on Beta(1.1, 2.2) it reached 89%).
DIGITS_TRAIN_DIFFICULTY = (1.1, 2.2)

_MEAN, _STD = 0.5, 0.5  # images are normalised to [-1, 1], like timm's "inception" convention


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    datasets = import_demo_package("sklearn.datasets", "the digits workload")
    bunch = datasets.load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # [1797, 8, 8] in [0, 1]
    return images, bunch.target.astype(np.int64)


@cache
def digit_split_sources(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` of the source images that belong to ``split`` (sorted).

    The three splits partition all 1797 images, so no source image is shared between them.

    Example:
        >>> train, evaluation = digit_split_sources("train"), digit_split_sources("evaluation")
        >>> len(set(train) & set(evaluation))
        0
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(DIGITS_SPLITS)}")
    n = len(_digits()[1])
    order = np.random.default_rng(_PARTITION_SEED).permutation(n)
    bounds = np.cumsum([0.0, *DIGITS_SPLITS.values()])
    i = list(DIGITS_SPLITS).index(split)
    start, stop = round(bounds[i] * n), round(bounds[i + 1] * n)
    return np.sort(order[start:stop])


def _affine_into(
    canvas_shape: tuple[int, int],
    glyph: np.ndarray,
    *,
    scale: float,
    angle: float,
    shear: float,
    aspect: float,
    centre: tuple[float, float],
) -> np.ndarray:
    """Warp ``glyph`` onto a canvas: glyph centre to ``centre`` (row, col), ``scale`` px per px."""
    from scipy.ndimage import affine_transform

    c, s = math.cos(angle), math.sin(angle)
    rotate = np.array([[c, -s], [s, c]])
    forward = scale * rotate @ np.array([[1.0, 0.0], [shear, 1.0]]) @ np.diag([1.0, aspect])
    inverse = np.linalg.inv(forward)  # affine_transform maps output coordinates to input ones
    glyph_centre = (np.array(glyph.shape, dtype=np.float64) - 1) / 2
    offset = glyph_centre - inverse @ np.asarray(centre, dtype=np.float64)
    out = affine_transform(glyph, inverse, offset, output_shape=canvas_shape, order=1, cval=0.0)
    return np.clip(out, 0.0, 1.0)


def _upsample(glyph8: np.ndarray) -> np.ndarray:
    """8x8 glyph -> 40x40: a zero border (strokes touching the edge would otherwise end in a
    straight cut, a give-away box), then a cubic zoom into smooth strokes."""
    from scipy.ndimage import zoom

    padded = np.pad(glyph8, 1)
    return np.clip(zoom(padded, 4, order=3, mode="nearest", grid_mode=True), 0.0, 1.0)


def _taper(height: int, width: int) -> np.ndarray:
    # Fragments fade out towards their window's edges, so clutter has no straight cut edges.
    def ramp(n: int) -> np.ndarray:
        x = (np.arange(n) + 0.5) / n
        return np.clip(np.minimum(x, 1 - x) * 4, 0.0, 1.0)

    return np.outer(ramp(height), ramp(width)).astype(np.float32)


class DigitImages(torch.utils.data.Dataset):
    """Labelled 3x64x64 renders of the scikit-learn digits of one split, lazy and deterministic.

    Sample ``i`` renders source image ``sources[i % len(sources)]`` (so ``size`` larger than the
    split gives several different renders of each source) with nuisances drawn from a generator
    seeded by ``(seed, split, i)``. Yields ``(image, label)``: a float32 ``[3, 64, 64]`` tensor in
    [-1, 1] and an int label in 0..9.

    Difficulty ``d ~ Beta(*difficulty)`` per sample (default ``Beta(1, 3)``: mostly easy, a tail of
    hard ones; the backbone is trained on the harder ``Beta(1.1, 2.2)``) scales every
    nuisance: scale spread, rotation (sd 6 + 34 d degrees), shear, translation, loss of contrast
    (down to 15%), colour tint, background gradient, Gaussian blur, pixel noise and the number of
    digit fragments in the background (Poisson with mean 0.3 + 4.5 d).

    Args:
        split: ``"train"``, ``"traffic"`` or ``"evaluation"`` (disjoint source images).
        size: number of samples; default one render per source image of the split.
        seed: varies every render, never the partition into splits.
        difficulty: ``(a, b)`` of the Beta distribution the per-sample difficulty is drawn from.

    Example:
        >>> data = DigitImages("evaluation", size=4)
        >>> image, label = data[0]
        >>> tuple(image.shape), image.dtype, 0 <= label < 10
        ((3, 64, 64), torch.float32, True)
    """

    def __init__(
        self,
        split: str,
        *,
        size: int | None = None,
        seed: int = 0,
        difficulty: tuple[float, float] = DIGITS_DIFFICULTY,
    ) -> None:
        if len(difficulty) != 2 or min(difficulty) <= 0:
            raise ValueError(f"difficulty must be Beta parameters (a, b) > 0, got {difficulty}")
        self.difficulty = (float(difficulty[0]), float(difficulty[1]))
        self.sources = digit_split_sources(split)
        self.split = split
        self.size = len(self.sources) if size is None else int(size)
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.size

    def source_index(self, index: int) -> int:
        """Index into ``sklearn.datasets.load_digits()`` of the source image of sample ``index``."""
        return int(self.sources[index % len(self.sources)])

    def label(self, index: int) -> int:
        """The label of sample ``index`` without rendering it."""
        return int(_digits()[1][self.source_index(index)])

    @property
    def labels(self) -> torch.Tensor:
        """All labels, ``[size]`` int64, without rendering."""
        targets = _digits()[1]
        return torch.from_numpy(targets[self.sources[np.arange(self.size) % len(self.sources)]])

    def describe(self, index: int) -> dict[str, Any]:
        """The drawn nuisance parameters of sample ``index`` (``difficulty`` first)."""
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range for {self.size} samples")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        d = float(rng.beta(*self.difficulty))
        height = float(np.clip(math.exp(rng.normal(math.log(0.7), 0.08 + 0.25 * d)), 0.32, 1.0))
        room = max(0.0, (1.0 - height) / 2) + 0.12 * d  # hard samples may be cut at the border
        contrast = float(np.clip(1.0 - d * rng.uniform(0.2, 0.95), 0.15, 1.0))
        low = rng.uniform(0.0, 1.0 - contrast)
        dark_on_light = bool(rng.random() < 0.5)
        tint = 0.1 + 0.5 * d
        n_clutter = int(rng.poisson(0.3 + 4.5 * d))
        pool = self.sources
        clutter = []
        images = _digits()[0]
        for _ in range(n_clutter):
            source = int(pool[rng.integers(len(pool))])
            # a window of a few source pixels with some ink and some empty space in it: a piece
            # of stroke, not a solid block (a few tries, deterministic through `rng`)
            for _ in range(8):
                h, w = (int(v) for v in rng.integers(3, 6, size=2))
                r0, c0 = int(rng.integers(0, 9 - h)), int(rng.integers(0, 9 - w))
                ink = float((images[source][r0 : r0 + h, c0 : c0 + w] > 0.5).mean())
                if 0.15 <= ink <= 0.6:
                    break
            clutter.append(
                {
                    "source": source,
                    "window": (r0, c0, h, w),
                    "scale": float(rng.uniform(0.5, 1.1)),  # output px per upsampled px
                    "angle": float(rng.uniform(-math.pi, math.pi)),
                    "centre": (float(rng.uniform(0, 64)), float(rng.uniform(0, 64))),
                    "alpha": float(rng.uniform(0.35, 1.0)),
                }
            )
        return {
            "difficulty": d,
            "source": self.source_index(index),
            "label": self.label(index),
            "height": height,  # digit height as a fraction of the canvas
            "angle": float(rng.normal(0.0, math.radians(6 + 34 * d))),
            "shear": float(rng.normal(0.0, 0.04 + 0.2 * d)),
            "aspect": float(math.exp(rng.normal(0.0, 0.05 + 0.15 * d))),
            "shift": (float(rng.uniform(-room, room)), float(rng.uniform(-room, room))),
            "background": float(low + contrast if dark_on_light else low),
            "foreground": float(low if dark_on_light else low + contrast),
            "tint_background": [float(v) for v in rng.uniform(-tint, tint, size=3)],
            "tint_foreground": [float(v) for v in rng.uniform(-tint, tint, size=3)],
            "gradient": [float(v) for v in rng.normal(0.0, 0.05 + 0.25 * d, size=2)],
            "clutter": clutter,
            "blur_sigma": float(d * rng.uniform(0.0, 1.6)),
            "noise_sigma": float(rng.uniform(0.0, 0.02 + 0.22 * d)),
            "noise_seed": int(rng.integers(2**31)),
        }

    def render(self, index: int) -> np.ndarray:
        """Sample ``index`` as a float32 ``[3, 64, 64]`` array in [0, 1] (before normalisation)."""
        from scipy.ndimage import gaussian_filter

        p = self.describe(index)
        images = _digits()[0]
        side = DIGITS_INPUT_SIZE[1]
        glyph = _upsample(images[p["source"]])
        mask = _affine_into(
            (side, side),
            glyph,
            scale=p["height"] * side / 32,  # the 8 source rows span 32 of the 40 upsampled
            angle=p["angle"],
            shear=p["shear"],
            aspect=p["aspect"],
            centre=((0.5 + p["shift"][0]) * side - 0.5, (0.5 + p["shift"][1]) * side - 0.5),
        )
        for frag in p["clutter"]:
            r0, c0, h, w = frag["window"]
            up = _upsample(images[frag["source"]])  # 1 source px of zero border = 4 px here
            piece = up[4 * (r0 + 1) : 4 * (r0 + 1 + h), 4 * (c0 + 1) : 4 * (c0 + 1 + w)]
            piece = piece * _taper(*piece.shape)
            piece = _affine_into(
                (side, side),
                piece,
                scale=frag["scale"],
                angle=frag["angle"],
                shear=0.0,
                aspect=1.0,
                centre=frag["centre"],
            )
            mask = np.maximum(mask, frag["alpha"] * piece)  # clutter in the digit's own colour
        rows, cols = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1) - 0.5
        gradient = p["gradient"][0] * rows + p["gradient"][1] * cols
        background = (
            p["background"] + np.asarray(p["tint_background"], np.float32)[:, None, None] + gradient
        )
        foreground = p["foreground"] + np.asarray(p["tint_foreground"], np.float32)[:, None, None]
        image = background * (1.0 - mask) + foreground * mask
        if p["blur_sigma"] > 0.05:
            image = gaussian_filter(image, sigma=(0.0, p["blur_sigma"], p["blur_sigma"]))
        noise = np.random.default_rng(p["noise_seed"]).standard_normal(image.shape)
        image = image + p["noise_sigma"] * noise
        return np.clip(image, 0.0, 1.0).astype(np.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += self.size
        image = (self.render(index) - _MEAN) / _STD
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), self.label(index)


def build_digits_backbone() -> torch.nn.Module:
    """An untrained reference backbone: timm ``regnety_002`` with 10 classes, otherwise standard.

    Example:
        >>> model = build_digits_backbone()
        >>> tuple(model(torch.zeros(2, *DIGITS_INPUT_SIZE)).shape)
        (2, 10)
    """
    import timm

    return timm.create_model(DIGITS_ARCH, pretrained=False, num_classes=10)


def save_digits_backbone(model: torch.nn.Module, path: str | Path = DIGITS_CHECKPOINT) -> str:
    """Write ``model``'s state dict as fp16 safetensors (halves the file; accuracy is checked by
    the training script). Returns the file's sha256."""
    return save_fp16_checkpoint(model, path, arch=DIGITS_ARCH)


def load_digits_backbone(path: str | Path | None = None) -> torch.nn.Module:
    """The trained reference backbone for the digits workload: eval mode, CPU, fp32.

    Example:
        >>> model = load_digits_backbone()
        >>> image, label = DigitImages("evaluation", size=1)[0]
        >>> model(image[None]).shape
        torch.Size([1, 10])
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DIGITS_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"no digits backbone checkpoint at {path}; train one with "
            "`python scripts/train_reference_backbone.py`"
        )
    state = as_fp32(load_file(path))
    model = build_digits_backbone()
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.inference_mode()
def evaluate_accuracy(
    model: torch.nn.Module, data: torch.utils.data.Dataset, *, batch_size: int = 256
) -> float:
    """Top-1 accuracy of ``model`` on a labelled dataset yielding ``(image, label)``.

    Example:
        >>> acc = evaluate_accuracy(load_digits_backbone(), DigitImages("evaluation", size=64))
        >>> 0.0 <= acc <= 1.0
        True
    """
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(-1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)


def train_digits_backbone(
    *,
    renders_per_source: int = 96,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the reference backbone on the train split; returns ``(model, recipe)``.

    One pass over ``renders_per_source`` fresh renders of every train source image (a fresh
    render per step, so no sample is seen twice), AdamW with a one-cycle cosine schedule, label
    smoothing. Reproducible: seeds torch and renders deterministically; the shuffling order comes
    from a seeded generator.

    Example:
        >>> model, recipe = train_digits_backbone(renders_per_source=1, progress=False)
        >>> recipe["arch"]
        'regnety_002'
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = build_digits_backbone().train()
    data = DigitImages(
        "train",
        size=len(digit_split_sources("train")) * renders_per_source,
        seed=seed,
        difficulty=DIGITS_TRAIN_DIFFICULTY,
    )
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=len(loader), pct_start=0.05
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    start = time.perf_counter()
    bar = tqdm(loader, desc="training digits backbone", disable=not progress)
    for images, labels in bar:
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    recipe = {
        "arch": DIGITS_ARCH,
        "num_classes": 10,
        "input_size": list(DIGITS_INPUT_SIZE),
        "train_sources": len(data.sources),
        "train_difficulty_beta": list(DIGITS_TRAIN_DIFFICULTY),
        "renders_per_source": renders_per_source,
        "train_samples": len(loader) * batch_size,
        "steps": len(loader),
        "batch_size": batch_size,
        "optimizer": f"AdamW(lr={lr}, weight_decay={weight_decay})",
        "schedule": "OneCycleLR(pct_start=0.05, cosine)",
        "label_smoothing": label_smoothing,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return model, recipe


def digits_record() -> dict[str, Any]:
    """The training record shipped next to the checkpoint (recipe and measured accuracy)."""
    return json.loads(DIGITS_RECORD.read_text())
