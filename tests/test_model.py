"""The Llama model: published sizes, meta-device construction in the storage dtype, causality."""

import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import leantrain
from leantrain.model import ModelArgs, build_model, build_model_from_args, model_args, num_params, sliding_window_mask


@pytest.mark.parametrize("flavor, published", [("1B", 1_235_814_400), ("8B", 8_030_261_248), ("70B", 70_553_706_496)])
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


# ---- the Llama-shaped families' differences (tests/test_hf.py checks them against transformers) -------------


def test_head_dim_is_independent_of_dim_when_given():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=50, head_dim=24)
    model = build_model_from_args(args)
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (4 * 24, 64) and attn.wk.weight.shape == (2 * 24, 64)
    assert attn.wo.weight.shape == (64, 4 * 24) and model.rope_cos.shape == (args.max_seq_len, 12)
    assert model(torch.randint(0, 50, (2, 8))).shape == (2, 8, 50)
    # Not given: dim // n_heads, as before, and overrides of a flavor's dims derive it again.
    assert ModelArgs(dim=64, n_heads=4).head_dim == 16
    assert build_model("debug", dim=32, n_heads=2, device="meta").args.head_dim == 16


def test_qkv_bias_and_qk_norm_add_their_parameters_and_start_neutral():
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=50)
    plain = num_params(build_model_from_args(ModelArgs(**base), device="meta"))
    biased = build_model_from_args(ModelArgs(**base, qkv_bias=True))
    normed = build_model_from_args(ModelArgs(**base, qk_norm=True))
    assert num_params(biased) == plain + 2 * (64 + 2 * 32)  # q, k, v biases per layer
    assert num_params(normed) == plain + 2 * (2 * 16)  # one head_dim weight each for q and k, per layer
    attn = biased.layers[0].attention
    assert all(torch.equal(b, torch.zeros_like(b)) for b in (attn.wq.bias, attn.wk.bias, attn.wv.bias))
    assert torch.equal(normed.layers[1].attention.k_norm.weight, torch.ones(16))
    assert biased.layers[0].attention.q_norm is None and normed.layers[0].attention.wq.bias is None


def test_sliding_window_mask_only_where_the_window_is_shorter_than_the_sequence():
    assert sliding_window_mask(16, 0, "cpu") is None and sliding_window_mask(16, 16, "cpu") is None
    mask = sliding_window_mask(6, 3, "cpu")
    assert mask.tolist()[4] == [False, False, True, True, True, False]  # itself and the 2 before it
    assert torch.equal(mask, mask.tril())  # causal


def test_sliding_window_limits_what_each_position_sees():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=50, sliding_window=4)
    model = build_model_from_args(args, seed=1)
    tokens = torch.randint(0, 50, (1, 16))
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 50
    diff = (model(changed) - model(tokens)).abs().amax(-1)[0]
    # One layer: token 5 reaches positions 5..8 (the window of 4), none before and none after.
    assert (diff[5:9] > 1e-6).all() and (diff[:5] == 0).all() and (diff[9:] == 0).all()
    # A window at least as long as the sequence is plain causal attention, bit for bit.
    wide = build_model_from_args(dataclasses.replace(args, sliding_window=16), seed=1)
    full = build_model_from_args(dataclasses.replace(args, sliding_window=0), seed=1)
    assert torch.equal(wide(tokens), full(tokens))


def test_an_older_checkpoints_model_args_still_describe_a_llama(tmp_path):
    """leantrain.json of a checkpoint written before head_dim, qkv_bias, qk_norm, sliding_window and family
    existed: the same Llama, and the resume check finds nothing different."""
    from leantrain.checkpoint.reading import _check_model_args

    new = model_args("debug", vocab_size=259)
    old = {
        k: v
        for k, v in dataclasses.asdict(new).items()
        if k not in ("head_dim", "qkv_bias", "qk_norm", "sliding_window", "family")
    }
    assert ModelArgs(**old) == new
    _check_model_args(tmp_path, {"model_args": old}, new)  # raises if anything differs
