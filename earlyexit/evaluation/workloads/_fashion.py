"""The "fashion" workload: an ImageNet EfficientNet-Lite0 fine-tuned on Fashion-MNIST.

The usual real deployment: a pretrained backbone fine-tuned on a domain with a handful of
classes. Fashion-MNIST (Zalando product photos, 28x28 grey, 10 classes; MIT licence) ships its
10,000-image test split inside this package (``fashion_mnist/``, with the licence notice), so the
demo needs nothing but ``pip``. The fine-tuned weights (fp16 safetensors) and the record of how
they were made sit next to this file; ``scripts/finetune_fashion_mnist.py`` made them from the
60,000 training images, which are *not* shipped (it reads the Debian package
``dataset-fashion-mnist`` or a folder you name).

Preprocessing is one batched function, :func:`fashion_preprocess`, shared by fine-tuning and
serving: grey 28x28 -> bilinear upsampling to 64x64 -> 3 equal channels -> ``(x - 0.5) / 0.5``
(the normalisation the TensorFlow-trained ``tf_efficientnet_lite0`` weights expect).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ShippedFileError  # defined in errors; re-exported here (old path)
from ._fp16 import as_fp32, save_fp16_checkpoint

__all__ = [
    "FASHION_ARCH",
    "FASHION_CHECKPOINT",
    "FASHION_CLASSES",
    "FASHION_DATA_DIR",
    "FASHION_INPUT_SIZE",
    "FASHION_RECORD",
    "FashionImages",
    "ShippedFileError",
    "build_fashion_backbone",
    "fashion_order",
    "fashion_preprocess",
    "fashion_record",
    "load_fashion_backbone",
    "read_fashion_split",
    "read_idx",
    "save_fashion_backbone",
]

#: timm architecture (the TensorFlow-faithful variant, see ``_photos``) that was fine-tuned.
FASHION_ARCH = "tf_efficientnet_lite0"
#: What the fine-tuned model sees: 28x28 grey upsampled to 64x64, grey repeated to 3 channels.
FASHION_INPUT_SIZE = (3, 64, 64)
#: The ten Fashion-MNIST classes, in label order.
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: The shipped test split (idx files as published, gzip) and its licence notice.
FASHION_DATA_DIR = Path(__file__).with_name("fashion_mnist")
FASHION_CHECKPOINT = Path(__file__).with_name("fashion_efficientnet_lite0.safetensors")
FASHION_RECORD = Path(__file__).with_name("fashion_efficientnet_lite0.json")

# File names of the published splits (the same in the Debian package and the original release).
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_MAGIC = {3: 2051, 1: 2049}  # unsigned-byte idx files of rank 3 (images) and 1 (labels)
_REINSTALL = "reinstall the package (pip install --force-reinstall --no-deps earlyexit, or pip install -e . in a checkout) to restore it"


def _shipped_error(path: Path, problem: str, shipped: bool) -> ShippedFileError:
    remedy = _REINSTALL if shipped else "check the file or download the dataset again"
    return ShippedFileError(f"{path}: {problem}; {remedy}")


def read_idx(path: str | Path, *, rank: int, shipped: bool = True) -> np.ndarray:
    """Read one gzip idx file (the MNIST format) of unsigned bytes with ``rank`` dimensions.

    Every problem (missing file, not gzip, truncated, wrong magic or shape) is one
    :class:`ShippedFileError` naming the file and what restores it.

    Example:
        >>> labels = read_idx(FASHION_DATA_DIR / "t10k-labels-idx1-ubyte.gz", rank=1)
        >>> labels.shape, labels.dtype
        ((10000,), dtype('uint8'))
    """
    path = Path(path)
    if not path.is_file():
        raise _shipped_error(path, "file not found", shipped)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise _shipped_error(path, f"not a readable gzip file ({exc})", shipped) from None
    header = 4 * (1 + rank)
    if len(raw) < header:
        raise _shipped_error(path, f"truncated: {len(raw)} bytes, no idx header", shipped)
    magic, *dims = np.frombuffer(raw[:header], dtype=">u4").tolist()
    if magic != _IDX_MAGIC[rank]:
        raise _shipped_error(
            path,
            f"not an idx file of rank {rank} (magic {magic}, expected {_IDX_MAGIC[rank]})",
            shipped,
        )
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise _shipped_error(
            path,
            f"holds {len(raw) - header} bytes of data, its header {tuple(dims)} says {expected}",
            shipped,
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def read_fashion_split(
    split: str = "test", directory: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N] uint8)`` of one published split.

    ``directory=None`` reads the test split shipped in the package; the training split is not
    shipped: pass the folder that holds it (e.g. ``/usr/share/datasets/fashion-mnist`` from the
    Debian package ``dataset-fashion-mnist``).

    Example:
        >>> images, labels = read_fashion_split("test")
        >>> images.shape, int(labels.max())
        ((10000, 28, 28), 9)
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_FILES)}")
    shipped = directory is None
    if shipped and split != "test":
        raise ValueError(
            "only the test split is shipped; pass directory= the folder with the training split "
            "(e.g. /usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist)"
        )
    folder = FASHION_DATA_DIR if shipped else Path(directory)
    image_file, label_file = (folder / name for name in _SPLIT_FILES[split])
    images = read_idx(image_file, rank=3, shipped=shipped)
    labels = read_idx(label_file, rank=1, shipped=shipped)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28) or labels.max() > 9:
        raise _shipped_error(
            folder,
            f"{image_file.name} / {label_file.name} do not form a Fashion-MNIST split (images "
            f"{images.shape}, {labels.shape[0]} labels, largest label {int(labels.max())})",
            shipped,
        )
    return images, labels


def fashion_preprocess(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Grey uint8 ``[N, 28, 28]`` (or one ``[28, 28]``) -> model input ``[N, 3, 64, 64]`` float32.

    Bilinear upsampling, grey repeated to three channels, then ``(x - 0.5) / 0.5``. The one
    preprocessing of this workload: fine-tuning applies its augmentation before it.

    Example:
        >>> fashion_preprocess(np.zeros((2, 28, 28), np.uint8)).shape
        torch.Size([2, 3, 64, 64])
    """
    x = torch.as_tensor(images)
    single = x.ndim == 2
    x = x.reshape(-1, 1, *x.shape[-2:]).float().div_(255.0)
    x = F.interpolate(x, size=FASHION_INPUT_SIZE[1:], mode="bilinear", align_corners=False)
    x = x.sub_(0.5).div_(0.5).expand(-1, 3, -1, -1).contiguous()
    return x[0] if single else x


class FashionImages(torch.utils.data.Dataset):
    """Fashion-MNIST images in a seeded order: ``(tensor [3, 64, 64], label)`` per item.

    ``order`` selects and orders rows of the split (the demo shuffles the test split with a seed
    and cuts it into traffic and held-out parts, see :func:`fashion_order`).

    Example:
        >>> data = FashionImages(*read_fashion_split("test"), order=np.arange(3))
        >>> image, label = data[0]
        >>> tuple(image.shape), FASHION_CLASSES[label]
        ((3, 64, 64), 'Ankle boot')
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, order: np.ndarray | None = None
    ) -> None:
        self.images = images
        self.label_array = labels
        self.order = np.arange(len(labels)) if order is None else np.asarray(order, np.int64)

    def __len__(self) -> int:
        return len(self.order)

    @property
    def labels(self) -> torch.Tensor:
        """Labels of every item, in order (int64)."""
        return torch.from_numpy(self.label_array[self.order].astype(np.int64))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = int(self.order[index])
        return fashion_preprocess(self.images[row]), int(self.label_array[row])


def fashion_order(size: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(size)``: the demo's traffic order.

    Example:
        >>> sorted(fashion_order(5, seed=0).tolist())
        [0, 1, 2, 3, 4]
    """
    return np.random.default_rng(seed).permutation(size)


def build_fashion_backbone() -> torch.nn.Module:
    """An untrained ``tf_efficientnet_lite0`` with a 10-class classifier.

    Example:
        >>> tuple(build_fashion_backbone()(torch.zeros(2, *FASHION_INPUT_SIZE)).shape)
        (2, 10)
    """
    import timm

    return timm.create_model(FASHION_ARCH, pretrained=False, num_classes=len(FASHION_CLASSES))


def save_fashion_backbone(model: torch.nn.Module, path: str | Path = FASHION_CHECKPOINT) -> str:
    """Write ``model``'s state dict as fp16 safetensors; returns the file's sha256."""
    return save_fp16_checkpoint(model, path, arch=FASHION_ARCH)


def load_fashion_backbone(path: str | Path | None = None) -> torch.nn.Module:
    """The fine-tuned EfficientNet-Lite0 of the fashion workload: eval mode, CPU, fp32.

    A missing or corrupt shipped file is a :class:`ShippedFileError` that names it.

    Example:
        >>> model = load_fashion_backbone()
        >>> images, labels = read_fashion_split("test")
        >>> model(fashion_preprocess(images[:1])).argmax(-1).item() == labels[0]
        True
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    shipped = path is None
    path = FASHION_CHECKPOINT if path is None else Path(path)
    if not path.is_file():
        raise _shipped_error(path, "file not found", shipped)
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _shipped_error(path, f"not a readable safetensors file ({exc})", shipped) from None
    model = build_fashion_backbone()
    try:
        model.load_state_dict(as_fp32(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise _shipped_error(
            path, f"does not hold {FASHION_ARCH} weights ({first})", shipped
        ) from None
    return model.eval()


def fashion_record() -> dict[str, Any]:
    """The record shipped next to the weights: how they were made and what they score."""
    try:
        return json.loads(FASHION_RECORD.read_text())
    except (OSError, ValueError) as exc:
        raise _shipped_error(FASHION_RECORD, f"unreadable ({exc})", True) from None
