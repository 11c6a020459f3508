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
