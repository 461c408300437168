"""Streams of images from a folder, through the model's own preprocessing (for ``earlyexit run``).

A folder is read as a labelled ImageFolder when its images sit in one sub-folder per class, and as
an unlabelled stream when they sit directly in it. Unreadable files are skipped and counted, never
fatal: production traffic has broken uploads too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from .errors import InputError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
)


@dataclass
class SkipLog:
    """Files that could not be read, shared by the splits of one folder."""

    files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def count(self) -> int:
        return len(self.files)


@dataclass
class FolderScan:
    """What a folder holds: image files, their labels (or ``None``) and the class names."""

    files: list[Path]
    labels: list[int] | None
    classes: list[str]


def scan_folder(root: str | Path) -> FolderScan:
    """Find the images under ``root`` (ImageFolder layout or a flat folder).

    Class indices: when every class folder is named by an integer (``"285"``), that integer is the
    model's class index; otherwise classes are numbered in sorted order, as torchvision's
    ImageFolder does (right for a model fine-tuned on that folder).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        InputError: no image files were found.

    Example:
        >>> scan = scan_folder("my_images")  # doctest: +SKIP
        >>> len(scan.files), scan.classes[:3]  # doctest: +SKIP
    """
    base = Path(root)
    if base.is_file():
        raise NotADirectoryError(f"{base} is a file; expected a folder of images")
    if not base.is_dir():
        raise FileNotFoundError(f"no such folder: {base}")

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        pattern = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    top = images_in(base, recursive=False)
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if top or not class_dirs:
        files = top or images_in(base, recursive=True)
        if not files:
            raise InputError(f"{base} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return FolderScan(files, None, [])
    classes = [d.name for d in class_dirs]
    numeric = all(name.isdigit() for name in classes)
    files, labels = [], []
    for i, folder in enumerate(class_dirs):
        for path in images_in(folder, recursive=True):
            files.append(path)
            labels.append(int(folder.name) if numeric else i)
    if not files:
        raise InputError(f"{base} has class folders but no images in them")
    return FolderScan(files, labels, classes)


def read_image(
    source: str | Path | BinaryIO,
    transform: Callable[[Any], Tensor],
    *,
    formats: tuple[str, ...] | None = None,
    max_pixels: int | None = None,
) -> Tensor:
    """Decode one image (a path or a binary file object) to RGB and preprocess it: how every
    image ``earlyexit run`` and ``earlyexit serve`` answer is read.

    ``formats`` limits the decoders tried (PIL format names, e.g. ``("PNG", "JPEG")``);
    ``max_pixels`` refuses larger images before they are decoded (a small compressed file can
    hold a huge image).

    Raises:
        PIL.UnidentifiedImageError: not an image (in ``formats``).
        OSError: a truncated or corrupt image.
        InputError: more than ``max_pixels`` pixels.

    Example:
        >>> x = read_image("cat.jpg", model_transform(model, "timm", "resnet18"))  # doctest: +SKIP
    """
    from PIL import Image

    with Image.open(source, formats=formats) as img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise InputError(
                f"the image has {img.width}x{img.height} pixels, more than the {max_pixels} "
                "allowed: resize it first"
            )
        return transform(img.convert("RGB"))


class ImageStream:
    """Re-iterable batches ``x`` (or ``(x, y)`` when labelled) of preprocessed images.

    ``len()`` is the number of files (some may turn out unreadable and are skipped, counted in
    ``skipped``). ``name`` says which images these are in messages (``"held-out"``).
    """

    def __init__(
        self,
        files: list[Path],
        labels: list[int] | None,
        transform: Callable[[Any], Tensor],
        *,
        batch_size: int = 32,
        skipped: SkipLog | None = None,
        name: str = "",
    ) -> None:
        self.files = files
        self.labels = labels
        self.transform = transform
        self.batch_size = batch_size
        self.skipped = skipped if skipped is not None else SkipLog()
        self.name = name
        self._seen_bad: set[str] = set()

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> Tensor | None:
        try:
            return read_image(path, self.transform)
        except Exception as err:  # corrupt, truncated, not an image: skip, count once
            if str(path) not in self._seen_bad:
                self._seen_bad.add(str(path))
                self.skipped.files.append((str(path), f"{type(err).__name__}: {err}"))
            return None

    def require_readable(self) -> None:
        """Raise :class:`~earlyexit.InputError`, naming the files, unless at least one image
        reads. Reads until the first image that does (usually the first file): a stream whose
        every file is broken is a data problem to report before any work, not an empty result.

        Example:
            >>> evaluation.require_readable()  # doctest: +SKIP
        """
        if any(self._load(path) is not None for path in self.files):
            return
        which = f"{self.name} " if self.name else ""
        if not self.files:
            raise InputError(f"there are no {which}images")
        bad = dict(self.skipped.files)
        raise InputError(
            f"none of the {len(self.files)} {which}image file(s) could be read; replace or remove "
            f"the unreadable files: {_describe_unreadable(self.files, bad)}"
        )

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        images: list[Tensor] = []
        targets: list[int] = []
        for i, path in enumerate(self.files):
            image = self._load(path)
            if image is None:
                continue
            images.append(image)
            if self.labels is not None:
                targets.append(self.labels[i])
            if len(images) == self.batch_size:
                yield self._batch(images, targets)
                images, targets = [], []
        if images:
            yield self._batch(images, targets)

    def _batch(self, images: list[Tensor], targets: list[int]) -> Tensor | tuple[Tensor, Tensor]:
        x = torch.stack(images)
        return x if self.labels is None else (x, torch.tensor(targets))


def split_stream(
    scan: FolderScan,
    transform: Callable[[Any], Tensor],
    *,
    eval_fraction: float = 0.2,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[ImageStream, ImageStream]:
    """Shuffle the files (seeded) and split them into traffic and held-out evaluation streams."""
    if not 0.0 < eval_fraction < 1.0:
        raise InputError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    order = list(range(len(scan.files)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_fraction))
    if len(order) - n_eval < 1:
        raise InputError(_too_few_to_split(scan.files, transform, eval_fraction))
    skipped = SkipLog()

    def part(indices: list[int], name: str) -> ImageStream:
        files = [scan.files[i] for i in indices]
        labels = None if scan.labels is None else [scan.labels[i] for i in indices]
        return ImageStream(
            files, labels, transform, batch_size=batch_size, skipped=skipped, name=name
        )

    return part(order[n_eval:], "traffic"), part(order[:n_eval], "held-out")


def _too_few_to_split(
    files: list[Path], transform: Callable[[Any], Tensor], eval_fraction: float
) -> str:
    """Why ``files`` cannot be split, saying how many of them are readable (only reached for a
    handful of files, or an ``eval_fraction`` close to 1, so reading them all here is cheap)."""
    probe = ImageStream(files, None, transform)
    readable = sum(probe._load(path) is not None for path in files)
    bad = dict(probe.skipped.files)
    if len(files) == 1:
        found = (
            f"the only image, {files[0]}, is unreadable ({_without(bad[str(files[0])], files[0])})"
            if bad
            else f"there is only one image ({files[0]})"
        )
        return f"{found}: at least 2 readable images are needed, one to serve and one to evaluate"
    unreadable = f"; unreadable: {_describe_unreadable(files, bad)}" if bad else ""
    return (
        f"{len(files)} images ({readable} readable) are too few to split into traffic and "
        f"evaluation with eval_fraction={eval_fraction}: lower it or add images{unreadable}"
    )


def _describe_unreadable(files: list[Path], reasons: dict[str, str], limit: int = 5) -> str:
    """``"a.jpg (why), b.jpg (why) and 3 more"`` for the unreadable ones among ``files``."""
    bad = [
        f"{path} ({_without(reasons[str(path)], path)})" for path in files if str(path) in reasons
    ]
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return ", ".join(bad[:limit]) + more


def _without(reason: str, path: Path) -> str:
    """``reason`` without the file's own name (PIL repeats it: ``cannot identify image file 'x'``)."""
    return reason.replace(f" '{path}'", "").replace(f" {path}", "")


def model_transform(
    model: nn.Module,
    source: str,
    name: str,
    *,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    crop_pct: float | None = None,
) -> Callable[[Any], Tensor]:
    """The model's own eval preprocessing (timm's data config, or torchvision's weights
    transforms), with optional overrides for models trained with another recipe.

    Example:
        >>> t = model_transform(timm.create_model("resnet18"), "timm", "resnet18", input_size=(3, 64, 64))  # doctest: +SKIP
    """
    overrides: dict[str, Any] = {}
    if input_size is not None:
        overrides["input_size"] = tuple(input_size)
    if mean is not None:
        overrides["mean"] = tuple(mean)
    if std is not None:
        overrides["std"] = tuple(std)
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    if source == "timm":
        import timm.data

        config = timm.data.resolve_data_config(overrides, model=model)
        return timm.data.create_transform(**config)
    import torchvision
    from torchvision import transforms as T

    if not overrides:
        try:
            return torchvision.models.get_model_weights(name).DEFAULT.transforms()
        except (ValueError, AttributeError):  # no published weights: ImageNet's usual recipe
            pass
    size = overrides.get("input_size", (3, 224, 224))[1:]
    pct = overrides.get("crop_pct", 0.875)
    return T.Compose(
        [
            T.Resize(tuple(round(s / pct) for s in size)),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(
                overrides.get("mean", (0.485, 0.456, 0.406)),
                overrides.get("std", (0.229, 0.224, 0.225)),
            ),
        ]
    )
