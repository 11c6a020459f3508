"""The random bits of stochastic rounding: a counter-based generator, a pure function of (key, element index).

Every bf16 tensor the optimizer writes stochastically needs 16 uniform random bits per element per step (a
*field*). They are computed, not drawn: field f of element i of a tensor at a step is

    hash32(i * 0x9E3779B9 + key[f // 2])      its low 16 bits for even f, its high 16 bits for odd f

where `hash32` is Wellons' "lowbias32" (two multiply-xorshift rounds; hash-prospector's best two-round 32-bit
hash, bias 0.17) and the keys are 32-bit values derived on the host from (job seed, the parameter's index in the
optimizer, its shard, the step) by splitmix64 (`StepKeys`). The counter `i * 0x9E3779B9 + key` is distinct for
every element index below 2^32 (0x9E3779B9 is odd), so within a step no two elements of a tensor share their bits.

Why a hash instead of a stateful generator (numpy's PCG64DXSM and torch's Philox before): the bits are a pure
function of values the kernel already has, so
* the compiled update computes them in registers (`update.py`): nothing is drawn outside the kernel, written to
  memory and read back;
* the eager path runs the very same torch integer ops, so eager and compiled results are bitwise equal;
* nothing about the generator needs saving: a resumed run recomputes the same keys from the step number;
* chunking or sharding a tensor does not change its bits: an element's bits are those of its index in the whole
  (global) tensor, whatever rank holds it (`ElementBox`): a chunk's keys fold in its first element's global
  index, and a column shard (tensor parallelism's row-wise matrices) counts its elements along the global rows.

Why not Philox-4x32-10 (torch's and Triton's): it needs the high half of 32x32-bit products, which torch's int32
ops do not give; in int64 it would cost several times the two 32-bit multiplies here. The hash's statistical
quality is tested instead (`tests/test_randbits.py`: chi-square uniformity of each field and of pairs of
neighbouring elements, of consecutive steps, of the fields of one element, and of the two halves of one hash).

int32 arithmetic wraps modulo 2^32 (torch's CPU and CUDA integer ops and inductor's C++ and Triton code all do);
a logical right shift is an arithmetic one with the sign-extended bits masked off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..utils import small_tensor

COUNTER_STEP = 0x9E3779B9  # odd, so the element index maps to distinct 32-bit counters
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
_M64 = (1 << 64) - 1


def _int32(c: int) -> int:
    """A 32-bit pattern as the int32 value torch stores for it."""
    c &= 0xFFFFFFFF
    return c - (1 << 32) if c >= 1 << 31 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 `x` by `s` bits."""
    return (x >> s).bitwise_and_((1 << (32 - s)) - 1)


def hash32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of every element of int32 `x`, in place (a bijection of 32-bit patterns)."""
    x ^= _shr(x, 16)
    x *= _int32(_M1)
    x ^= _shr(x, 15)
    x *= _int32(_M2)
    x ^= _shr(x, 16)
    return x


def fields(
    numel: int, keys: torch.Tensor, count: int, device, strided: tuple[int, int] | None = None
) -> list[torch.Tensor]:
    """`count` random fields (int32 in [0, 2^16)) for `numel` consecutive elements, from int32 `keys` (one per
    two fields, with the first element's global index folded in: `StepKeys.tensor`). ``strided``: (local, global)
    row widths of a column shard, whose consecutive local elements are not consecutive globally
    (`ElementBox.strided`). The same ops eager and compiled."""
    counters = _counters(numel, device) if strided is None else _strided_counters(numel, *strided, device)
    out = []
    for h in range((count + 1) // 2):
        bits = hash32_(counters + keys[h])
        high = _shr(bits, 16) if len(out) + 1 < count else None
        out.append(bits.bitwise_and_(0xFFFF))
        if high is not None:
            out.append(high)
    return out


_COUNTERS: dict = {}  # eager CPU: the counters of the largest chunk so far, by device (compiled: in registers)


def _counters(numel: int, device) -> torch.Tensor:
    """i * COUNTER_STEP for i < numel (int32, wrapping)."""
    if torch.compiler.is_compiling() or torch.device(device).type != "cpu":
        return torch.arange(numel, dtype=torch.int32, device=device) * _int32(COUNTER_STEP)
    cached = _COUNTERS.get(device)
    if cached is None or cached.numel() < numel:
        cached = _COUNTERS[device] = torch.arange(numel, dtype=torch.int32) * _int32(COUNTER_STEP)
    return cached[:numel]


def _strided_counters(numel: int, local_cols: int, global_cols: int, device) -> torch.Tensor:
    """The counters of a column shard's elements: local element i sits (i // local_cols) global rows and
    (i % local_cols) columns after the chunk's first element."""
    i = torch.arange(numel, dtype=torch.int32, device=device)
    return ((i // local_cols) * global_cols + i % local_cols) * _int32(COUNTER_STEP)


def splitmix64(x: int) -> int:
    """splitmix64's output function of the 64-bit value x (Steele et al.): the host-side key mixer."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def tensor_key(seed: int, index: int) -> int:
    """The 64-bit key of one parameter: the job seed and its index among the optimizer's parameters (the same on
    every rank: a shard's elements are told apart by their global indices, `ElementBox`)."""
    return splitmix64(splitmix64(seed & _M64) ^ index)


@dataclass(frozen=True)
class ElementBox:
    """Where this rank's part of a parameter lies in the whole one, seen as [rows, global_cols] (a matrix; a vector
    is a column): its first element at (row0, col0), its rows `local_cols` wide (chunks of whole rows, which the
    factored rule needs, are multiples of it). A plain tensor, or a shard of whole rows (FSDP2, tensor
    parallelism's column-wise matrices), is one run of consecutive global indices; a column shard (row-wise
    matrices) is `strided`."""

    row0: int = 0
    col0: int = 0
    local_cols: int = 1
    global_cols: int = 1

    @classmethod
    def of(cls, p: torch.Tensor) -> ElementBox:
        """The box of this rank's part of ``p`` (a plain tensor: the whole of it)."""
        from ..distributed import is_dtensor

        width = math.prod(p.shape[1:])  # 1 for a vector (and a scalar)
        if not is_dtensor(p) or p.ndim == 0:
            return cls(0, 0, width, width)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if any(offset[2:]) or any(s != g for s, g in zip(shape[2:], p.shape[2:])):
            raise ValueError(f"random bits: a shard of a {p.ndim}-D parameter cut past dim 1 ({p.placements})")
        local_width = math.prod(shape[1:])
        col0 = offset[1] * math.prod(p.shape[2:]) if p.ndim > 1 else 0
        return cls(offset[0], col0, local_width, width)

    @property
    def strided(self) -> tuple[int, int] | None:
        """(local, global) row widths where this part's elements are not consecutive globally, else None."""
        return None if self.local_cols == self.global_cols else (self.local_cols, self.global_cols)

    def global_index(self, i: int) -> int:
        """The global index of this part's element i (chunks of a strided part start at whole local rows)."""
        return (self.row0 + i // self.local_cols) * self.global_cols + self.col0 + i % self.local_cols


class StepKeys:
    """The hash keys of one parameter at one step: one per two random fields."""

    def __init__(self, key: int, step: int, count: int, box: ElementBox = ElementBox()):
        self.keys = [splitmix64(key ^ splitmix64((step << 8) | h)) & 0xFFFFFFFF for h in range((count + 1) // 2)]
        self.box = box

    def tensor(self, offset: int, device) -> torch.Tensor:
        """The keys of the chunk that starts at this rank's element `offset`, as int32 on `device` (see `fields`):
        the global index of that element folded in."""
        shift = self.box.global_index(offset) * COUNTER_STEP
        return small_tensor([_int32(k + shift) for k in self.keys] or [0], torch.int32, device)
