"""The random bits of stochastic rounding (leantrain.optim.randbits): uniform, independent where SR needs it,
a pure function of (key, element index).

What stochastic rounding needs from its bits: each element's 16-bit field uniform (else the rounding is biased),
and no dependence between the fields of different elements of a step, of one element at consecutive steps, and of
the three fields (weight, exp_avg, exp_avg_sq) of one element (else rounding errors correlate and stop averaging
out). Each is tested with a chi-square test of 2^20 draws (deterministic keys, so a test's outcome is fixed), at
the 1e-4 tail of the chi-square distribution (Wilson-Hilferty), on the high and on the low bits of the fields. A
negative control shows the pair tests have power: the counters without the hash (a Weyl sequence, whose
neighbours are linearly related) fail them.
"""

from __future__ import annotations

import math

import pytest
import torch

from leantrain.optim import randbits

N = 1 << 20
Z_1E4 = 3.719  # the standard normal's 1 - 1e-4 quantile


def chi2_limit(df: int) -> float:
    """The chi-square statistic exceeded with probability 1e-4 (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + Z_1E4 * math.sqrt(2 / (9 * df))) ** 3


def chi2(cells: torch.Tensor, bins: int) -> float:
    counts = torch.bincount(cells.long(), minlength=bins).double()
    expected = cells.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


def fields(step=1, index=0, count=3, numel=N, offset=0, seed=0):
    keys = randbits.StepKeys(randbits.tensor_key(seed, index), step, count)
    return randbits.fields(numel, keys.tensor(offset, "cpu"), count, "cpu")


def assert_uniform(x: torch.Tensor, bits: int = 16):
    assert x.dtype == torch.int32 and int(x.min()) >= 0 and int(x.max()) < 1 << bits
    assert chi2(x, 1 << bits) < chi2_limit((1 << bits) - 1)


def assert_independent(a: torch.Tensor, b: torch.Tensor):
    """Pairs (a_i, b_i): their top 4 bits and, separately, their low 4 bits are jointly uniform over 256 cells."""
    for shift in (12, 0):
        cells = ((a >> shift) & 15) * 16 + ((b >> shift) & 15)
        assert chi2(cells, 256) < chi2_limit(255), shift


def test_every_field_is_uniform_over_16_bits():
    for f in fields():
        assert_uniform(f)
        for k in range(16):  # and each bit is a fair coin (a bias the 65536-bin test could dilute)
            assert abs(((f >> k) & 1).double().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(N)


def test_neighbouring_elements_are_independent():
    for f in fields():
        assert_independent(f[:-1], f[1:])
        assert_independent(f[:-256], f[256:])  # an int8 block apart


def test_consecutive_steps_are_independent():
    for a, b in zip(fields(step=7), fields(step=8)):
        assert_independent(a, b)


def test_the_fields_of_one_element_are_independent():
    w, m, v = fields()
    assert_independent(w, m)  # the two halves of one hash
    assert_independent(w, v)  # two hashes
    assert_independent(m, v)


def test_parameters_and_seeds_get_independent_bits():
    assert_independent(fields(index=0)[0], fields(index=1)[0])
    assert_independent(fields(seed=0)[0], fields(seed=1)[0])


@pytest.mark.parametrize("rows, cols", [(8, 12), (5, 6)])
def test_every_shard_draws_the_whole_tensors_bits_for_its_elements(rows, cols):
    """A part of a [rows, cols] parameter, cut by rows (FSDP2, column-wise tensor parallelism) or by columns (row-wise
    tensor parallelism), and chunked by whole local rows, draws for each element the bits of that element in the
    unsharded tensor: the sharding and chunking of a run do not change its random bits."""
    keys = randbits.StepKeys(randbits.tensor_key(7, 3), 5, 3)
    whole = torch.stack(randbits.fields(rows * cols, keys.tensor(0, "cpu"), 3, "cpu")).view(3, rows, cols)
    half_rows, half_cols = rows // 2, cols // 2
    parts = {  # (row0, col0, local rows, local cols)
        "rows": (half_rows, 0, rows - half_rows, cols),
        "cols": (0, half_cols, rows, cols - half_cols),
    }
    for r0, c0, r, c in parts.values():
        box = randbits.ElementBox(r0, c0, c, cols)
        shard = randbits.StepKeys(randbits.tensor_key(7, 3), 5, 3, box)
        for first_row in range(0, r, 2):  # chunks of two whole local rows
            n = min(2, r - first_row) * c
            got = randbits.fields(n, shard.tensor(first_row * c, "cpu"), 3, "cpu", box.strided)
            want = whole[:, r0 + first_row : r0 + first_row + n // c, c0 : c0 + c].reshape(3, -1)
            assert torch.equal(torch.stack(got), want)


def test_the_pair_tests_detect_dependent_bits():
    """Negative control: the hash's input (counters of a Weyl sequence) is uniform but linearly related across
    neighbours; the pair test must reject it, or it could not fail."""
    key = randbits.StepKeys(randbits.tensor_key(0, 0), 1, 1).tensor(0, "cpu")
    weyl = (randbits._counters(N + 1, "cpu") + key[0]) >> 16 & 0xFFFF
    with pytest.raises(AssertionError):
        assert_independent(weyl[:-1], weyl[1:])


def test_chunks_get_the_bits_of_the_whole_tensor():
    whole = fields(numel=5000)
    for a, b in ((0, 1024), (1024, 3000), (3000, 5000)):
        part = fields(numel=b - a, offset=a)
        assert all(torch.equal(x[a:b], y) for x, y in zip(whole, part))


def test_element_indices_wrap_only_at_2_32():
    """Offsets far into a large tensor fold into the key modulo 2^32 without overflowing int32: a chunk across
    2^31 equals its two halves computed apart, and a chunk across 2^32 continues with the bits of element 0."""
    across = fields(numel=4096, offset=(1 << 31) - 2048)[0]
    assert torch.equal(across[:2048], fields(numel=2048, offset=(1 << 31) - 2048)[0])
    assert torch.equal(across[2048:], fields(numel=2048, offset=1 << 31)[0])
    wrapped = fields(numel=4096, offset=(1 << 32) - 2048)[0]
    assert torch.equal(wrapped[2048:], fields(numel=2048)[0])
    assert not torch.equal(wrapped[:2048], wrapped[2048:])


def test_keys_are_a_pure_function_of_seed_index_step():
    assert all(torch.equal(a, b) for a, b in zip(fields(step=3), fields(step=3)))
    assert len({randbits.tensor_key(s, i) for s in range(3) for i in range(3)}) == 9


def test_the_hash_is_a_bijection_so_no_two_counters_share_bits():
    """lowbias32 is invertible, so distinct counters give distinct 32-bit outputs within a step."""
    x = torch.arange(1 << 20, dtype=torch.int32)
    assert torch.unique(randbits.hash32_(x.clone())).numel() == 1 << 20
