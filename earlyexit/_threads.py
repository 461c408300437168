"""Pinning torch's intra-op CPU threads for a block of work, restored afterwards.

Used for measurements (a fixed thread count makes timings comparable) and for work made of many
tiny tensor ops (head training, fitting the learned gate), where fanning each op out over the
intra-op pool costs more than it gains, and far more on a busy machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Fix ``torch``'s intra-op CPU threads (``None``: leave them) for a block, then restore them.

    Example:
        >>> with fixed_threads(1):
        ...     torch.get_num_threads()
        1
    """
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
