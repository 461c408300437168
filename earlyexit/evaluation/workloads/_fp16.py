"""fp16 safetensors storage of the reference backbones: half the file, fp32 compute once loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def save_fp16_checkpoint(model: torch.nn.Module, path: str | Path, *, arch: str) -> str:
    """Write ``model``'s state dict as fp16 safetensors (floating tensors only; integer buffers
    stay as they are), with ``arch`` in the metadata. Returns the file's sha256.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> len(save_fp16_checkpoint(torch.nn.Linear(2, 2), path, arch="linear"))
        64
    """
    from safetensors.torch import save_file

    state = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path), metadata={"arch": arch, "storage": "float16"})
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_record(path: str | Path) -> dict[str, object]:
    """What a training record says about a checkpoint written by :func:`save_fp16_checkpoint`:
    file name, storage, size and sha256 (the tests check the shipped file against it).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = save_fp16_checkpoint(torch.nn.Linear(2, 2), path, arch="linear")
        >>> sorted(checkpoint_record(path))
        ['bytes', 'file', 'sha256', 'storage']
    """
    path = Path(path)
    return {
        "file": path.name,
        "storage": "float16",
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def as_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored state dict with floating tensors back in fp32 (the models compute in fp32).

    Example:
        >>> as_fp32({"w": torch.ones(1, dtype=torch.float16)})["w"].dtype
        torch.float32
    """
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
