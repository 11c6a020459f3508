"""Small general-purpose helpers."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def set_default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Within the block, floating-point tensors and modules are created in ``dtype``.

    Like ``with torch.device(...)`` for dtypes (PyTorch has no such context manager). Used with
    ``torch.device("meta")`` to build a model directly in its storage dtype, so that full bf16
    never allocates an fp32 copy of the weights. Restores the previous default even on error.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def small_tensor(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A few host values as a tensor on `device`, without waiting for the device.

    `torch.tensor(values, device=cuda)` copies from pageable memory and synchronizes the stream: the CPU would wait
    for every kernel queued before it. The optimizer makes such tensors per parameter (its step scalars and random
    keys), so on a GPU the copy goes through pinned memory, asynchronously (torch's caching host allocator keeps
    the pinned block alive until the copy has run).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
