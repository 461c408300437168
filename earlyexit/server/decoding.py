"""From an HTTP request body to a checked batch: one image or an ``.npy`` batch, or a 4xx.

Every check happens here, before a request joins a batch, so a bad request is answered on its own
(a 400, 413 or 415 with a message saying what was expected) and never fails the requests it would
have been served with, nor reaches the learner. Images are read exactly as ``earlyexit run`` reads
them (:func:`earlyexit.data.read_image` with the model's own preprocessing).

Example:
    >>> decoder = RequestDecoder(transform, input_size=(3, 64, 64))  # doctest: +SKIP
    >>> x = decoder.decode("image/png", png_bytes)  # doctest: +SKIP
    >>> x.shape  # doctest: +SKIP
    torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import read_image
from ..errors import InputError

__all__ = [
    "IMAGE_TYPES",
    "NPY_TYPE",
    "RequestDecoder",
    "RequestError",
    "media_type",
]

#: Content types of one image, and the PIL decoder each one asks for.
IMAGE_TYPES: dict[str, str] = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
#: Content type of a preprocessed batch saved with ``numpy.save``.
NPY_TYPE = "application/x-npy"
#: A compressed image may hold far more pixels than its bytes suggest: refuse beyond this
#: (a 40-megapixel photo passes).
DEFAULT_MAX_PIXELS = 50_000_000


class RequestError(Exception):
    """A request the server refuses: its HTTP status (4xx) and a message saying what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` header, lower case, parameters dropped.

    Example:
        >>> media_type("Image/PNG; charset=binary")
        'image/png'
    """
    return (content_type or "").split(";", 1)[0].strip().lower()


def _expected_types() -> str:
    return f"image/png or image/jpeg (one image), or {NPY_TYPE} (a preprocessed float32 batch)"


class RequestDecoder:
    """Turn a request body into a ``[B, C, H, W]`` float batch the model can serve, or refuse it.

    Args:
        transform: the model's preprocessing (:func:`earlyexit.data.model_transform`), applied to
            every image as ``earlyexit run`` applies it.
        input_size: ``(C, H, W)`` every sample must have (what the transform produces).
        dtype: the dtype of the batch handed to the model.
        max_pixels: largest image accepted, in pixels (checked before decoding).
    """

    def __init__(
        self,
        transform: Callable[[Any], Tensor],
        input_size: tuple[int, int, int],
        *,
        dtype: torch.dtype = torch.float32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.transform = transform
        self.input_size = tuple(int(v) for v in input_size)
        self.dtype = dtype
        self.max_pixels = max_pixels

    def check_content_type(self, content_type: str | None) -> str:
        """The media type of ``content_type`` if the server takes it (before reading a body).

        Raises:
            RequestError: 415, saying which types are taken.

        Example:
            >>> decoder.check_content_type("image/jpeg")  # doctest: +SKIP
            'image/jpeg'
        """
        kind = media_type(content_type)
        if kind not in IMAGE_TYPES and kind != NPY_TYPE:
            got = f"Content-Type {kind!r}" if kind else "no Content-Type"
            raise RequestError(415, f"got {got}; expected {_expected_types()}")
        return kind

    def decode(self, content_type: str | None, body: bytes) -> Tensor:
        """The batch in ``body`` (``[1, C, H, W]`` for an image).

        Raises:
            RequestError: 415 for a missing or unsupported content type, 400 for an empty or
                malformed body, a batch of the wrong rank, channels, size or dtype, or NaN/Inf.

        Example:
            >>> decoder.decode("application/x-npy", npy_bytes).shape  # doctest: +SKIP
            torch.Size([8, 3, 64, 64])
        """
        kind = self.check_content_type(content_type)
        if not body:
            raise RequestError(400, f"the request body is empty; expected {_expected_types()}")
        if kind == NPY_TYPE:
            return self._from_npy(body)
        return self._from_image(body, kind)

    def _from_image(self, body: bytes, kind: str) -> Tensor:
        from PIL import UnidentifiedImageError

        want = IMAGE_TYPES[kind]
        try:
            x = read_image(
                io.BytesIO(body),
                self.transform,
                formats=("PNG", "JPEG"),
                max_pixels=self.max_pixels,
            )
        except UnidentifiedImageError:
            raise RequestError(
                400, f"the body is not a PNG or JPEG image; expected one {want} image ({kind})"
            ) from None
        except InputError as err:  # too many pixels
            raise RequestError(400, str(err)) from None
        except Exception as err:  # truncated or corrupt data: PIL raises OSError, ValueError, ...
            raise RequestError(
                400,
                f"the image could not be decoded ({type(err).__name__}: {err}); expected a "
                f"complete {want} file",
            ) from None
        if tuple(x.shape) != self.input_size:  # the preprocessing itself disagrees with the model
            raise RuntimeError(
                f"the preprocessing produced {tuple(x.shape)}, the model takes {self.input_size}"
            )
        return x.unsqueeze(0).to(self.dtype)

    def _from_npy(self, body: bytes) -> Tensor:
        c, h, w = self.input_size
        want = f"a float32 .npy array [B, {c}, {h}, {w}], preprocessed like the model's images"
        shape, fortran_order, dtype, offset = _npy_header(body, want)
        # Everything is checked on the header, before any array is allocated: a header may
        # announce far more data than the body holds.
        if dtype.kind != "f" or dtype.itemsize != 4:
            raise RequestError(400, f"the array is {dtype}; expected {want}")
        if len(shape) != 4:
            raise RequestError(400, f"the array has shape {shape}; expected {want}")
        if shape[0] == 0:
            raise RequestError(400, f"the array holds no samples (shape {shape}); expected {want}")
        if shape[1] != c:
            raise RequestError(400, f"the array has {shape[1]} channels; expected {want}")
        if shape[2:] != (h, w):
            raise RequestError(400, f"the images are {shape[2]}x{shape[3]}; expected {want}")
        count = shape[0] * c * h * w
        if len(body) - offset != count * dtype.itemsize:
            raise RequestError(
                400,
                f"the array data is {len(body) - offset} bytes, its header announces "
                f"{count * dtype.itemsize} (truncated?); expected {want}",
            )
        array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        array = array.reshape(shape, order="F" if fortran_order else "C")
        if not np.isfinite(array).all():
            raise RequestError(400, f"the array contains NaN or Inf values; expected {want}")
        # A native-order, writable, contiguous copy (the body's buffer is read-only).
        native = np.array(array, dtype=np.float32, order="C", copy=True)
        return torch.from_numpy(native).to(self.dtype)


def _npy_header(body: bytes, want: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of an ``.npy`` body (format 1.0 or 2.0)."""
    from numpy.lib import format as npy

    stream = io.BytesIO(body)
    try:
        version = npy.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = npy.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = npy.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as err:  # not an .npy file, a truncated or malformed header
        raise RequestError(
            400,
            f"the body is not a readable .npy array ({type(err).__name__}: {err}); expected "
            f"{want} (numpy.save)",
        ) from None
    return tuple(int(v) for v in shape), bool(fortran_order), dtype, stream.tell()
