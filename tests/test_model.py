"""The Llama model: published sizes, meta-device construction in the storage dtype, causality."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import leantrain
from leantrain.model import build_model, num_params


@pytest.mark.parametrize("flavor, published", [
    ("1B", 1_235_814_400), ("8B", 8_030_261_248), ("70B", 70_553_706_496)])
def test_parameter_counts_match_published_llama(flavor, published):
    model = build_model(flavor, torch.bfloat16, device="meta")
    assert num_params(model) == published


def test_small_flavor_is_10_to_20M():
    assert 10e6 <= num_params(build_model("small", device="meta")) <= 20e6


class _LiveFloat32(TorchDispatchMode):
    """Tracks the peak bytes of live fp32 tensors created while it is active."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()  # in-place ops return their input: count each storage once

    def _release(self, key, n):
        self.storages.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu":
                key = t.untyped_storage().data_ptr()
                if key in self.storages:
                    continue
                n = t.untyped_storage().nbytes()
                self.storages.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, key, n)
        return out


def test_bf16_build_never_holds_an_fp32_copy():
    with _LiveFloat32() as tracker:
        model = leantrain.build_model("small", dtype=torch.bfloat16)
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    largest = max(p.numel() for p in params) * 4
    rope = model.rope_cos.numel() * 4 * 2
    # At most one parameter's fp32 draw (plus RoPE's fp32 tables) is alive at any time; a full fp32 copy
    # would be about 4 bytes x 12.8M params.
    assert tracker.peak <= largest + 2 * rope, (tracker.peak, largest, rope)
    assert tracker.peak < 0.1 * 4 * num_params(model)


def test_set_default_dtype_restores_even_on_error():
    before = torch.get_default_dtype()
    with pytest.raises(RuntimeError):
        with leantrain.set_default_dtype(torch.bfloat16):
            assert torch.empty(1).dtype == torch.bfloat16
            raise RuntimeError
    assert torch.get_default_dtype() == before


def test_forward_shapes_dtype_and_causality():
    model = build_model("debug", torch.float32, n_kv_heads=1)
    tokens = torch.randint(0, 259, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 259)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 259
    # Changing token 10 changes nothing before it (causal attention).
    assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-6)
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_dimension_overrides_and_bad_shapes():
    model = build_model("debug", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=300)
    assert model.args.dim == 32 and len(model.layers) == 1 and model.output.out_features == 300
    with pytest.raises(ValueError, match="n_kv_heads"):
        build_model("debug", n_heads=4, n_kv_heads=3)


def test_tied_embeddings_share_storage():
    model = build_model("debug", tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
