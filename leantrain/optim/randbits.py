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
* chunking or sharding a tensor does not change its bits (a chunk's keys fold in its first element's index).

Why not Philox-4x32-10 (torch's and Triton's): it needs the high half of 32x32-bit products, which torch's int32
ops do not give; in int64 it would cost several times the two 32-bit multiplies here. The hash's statistical
quality is tested instead (`tests/test_randbits.py`: chi-square uniformity of each field and of pairs of
neighbouring elements, of consecutive steps, of the fields of one element, and of the two halves of one hash).

int32 arithmetic wraps modulo 2^32 (torch's CPU and CUDA integer ops and inductor's C++ and Triton code all do);
a logical right shift is an arithmetic one with the sign-extended bits masked off.
"""

from __future__ import annotations

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


def fields(numel: int, keys: torch.Tensor, count: int, device) -> list[torch.Tensor]:
    """`count` random fields (int32 in [0, 2^16)) for `numel` consecutive elements, from int32 `keys` (one per
    two fields, with the first element's index folded in: `StepKeys.tensor`). The same ops eager and compiled."""
    counters = _counters(numel, device)
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


def splitmix64(x: int) -> int:
    """splitmix64's output function of the 64-bit value x (Steele et al.): the host-side key mixer."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def tensor_key(seed: int, index: int, shard: int = 0) -> int:
    """The 64-bit key of one parameter: the job seed, its index among the optimizer's parameters, and which shard
    of it this rank holds (replicas of a shard get the same key; shard 0 the key of an unsharded run)."""
    key = splitmix64(splitmix64(seed & _M64) ^ index)
    return splitmix64(key ^ (shard * 0x9E3779B97F4A7C15 & _M64)) if shard else key


class StepKeys:
    """The hash keys of one parameter at one step: one per two random fields."""

    def __init__(self, key: int, step: int, count: int):
        self.keys = [splitmix64(key ^ splitmix64((step << 8) | h)) & 0xFFFFFFFF for h in range((count + 1) // 2)]

    def tensor(self, offset: int, device) -> torch.Tensor:
        """The keys of the chunk that starts at element `offset`, as int32 on `device` (see `fields`)."""
        shift = offset * COUNTER_STEP
        return small_tensor([_int32(k + shift) for k in self.keys] or [0], torch.int32, device)
