"""A cascade tier served by a model behind an HTTP endpoint (``.npy`` in, ``.npy`` out)."""

from __future__ import annotations

import io
import urllib.error
import urllib.request

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, RemoteTierError
from .tiers import Tier, TierOutput


def encode_npy(array: Tensor | np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (no pickles): the remote tier's wire format."""
    buffer = io.BytesIO()
    data = array.detach().cpu().numpy() if isinstance(array, Tensor) else array
    np.save(buffer, np.ascontiguousarray(data), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """The array in ``.npy`` bytes; refuses pickled objects."""
    return np.load(io.BytesIO(data), allow_pickle=False)


class RemoteTier(Tier):
    """A model behind an HTTP endpoint: ``POST`` a float32 ``[B, C, H, W]`` ``.npy`` body, get
    ``[B, K]`` logits back as ``.npy``. Batches larger than ``max_batch`` are split into calls.

    Args:
        url: the endpoint, e.g. ``"http://127.0.0.1:8080/predict"``.
        cost_per_call: cost of one request (shared by the samples it carries).
        cost_per_sample: cost of each sample on top.
        timeout: seconds to wait for each call before failing with :class:`RemoteTierError`.
        max_batch: most samples per call.
        num_classes: if given, replies of another width are rejected.

    Example:
        >>> tier = RemoteTier("http://127.0.0.1:8080/predict", cost_per_call=1e6, timeout=5.0)
    """

    def __init__(
        self,
        url: str,
        *,
        cost_per_call: float = 0.0,
        cost_per_sample: float = 0.0,
        timeout: float = 10.0,
        max_batch: int = 64,
        num_classes: int | None = None,
        name: str = "remote",
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"the remote tier needs an http(s) URL, got {url!r}")
        if timeout <= 0 or max_batch < 1:
            raise ConfigError("timeout must be > 0 and max_batch >= 1")
        self.url = url
        self.cost_per_call = float(cost_per_call)
        self.cost_per_sample = float(cost_per_sample)
        self.timeout = float(timeout)
        self.max_batch = int(max_batch)
        self.num_classes = num_classes
        self.name = name
        self.calls = 0

    def _call(self, chunk: Tensor) -> Tensor:
        request = urllib.request.Request(
            self.url,
            data=encode_npy(chunk.float()),
            headers={"Content-Type": "application/x-npy"},
            method="POST",
        )
        where = f"remote tier {self.name!r} at {self.url}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                body = reply.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode("utf-8", "replace")
            raise RemoteTierError(f"{where} answered HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RemoteTierError(
                f"{where} did not answer within {self.timeout:g} s or is unreachable ({reason}); "
                "check that the server runs, or raise timeout="
            ) from err
        self.calls += 1
        try:
            logits = torch.from_numpy(decode_npy(body).copy())
        except (ValueError, OSError) as err:
            raise RemoteTierError(f"{where} sent a reply that is not .npy data: {err}") from err
        width = self.num_classes
        if (
            logits.dim() != 2
            or logits.shape[0] != chunk.shape[0]
            or (width and logits.shape[1] != width)
        ):
            raise RemoteTierError(
                f"{where} returned shape {tuple(logits.shape)} for {chunk.shape[0]} samples; "
                f"expected [{chunk.shape[0]}, {width or 'K'}]"
            )
        return logits

    def run(self, x: Tensor) -> TierOutput:
        parts, costs = [], []
        for chunk in x.split(self.max_batch):
            parts.append(self._call(chunk).to(x.device))
            share = self.cost_per_call / chunk.shape[0] + self.cost_per_sample
            costs.append(torch.full((chunk.shape[0],), share, dtype=torch.float64))
        return TierOutput(torch.cat(parts), torch.cat(costs))


__all__ = ["RemoteTier", "RemoteTierError", "decode_npy", "encode_npy"]
