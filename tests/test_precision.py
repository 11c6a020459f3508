"""The fp32 islands (listed in leantrain/precision.py): each test fails if its island is removed."""

import math

import pytest

import torch
import torch.nn.functional as F

from leantrain import precision
from leantrain.model import build_model


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers around |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7)


def test_rope_tables_are_fp32_in_a_bf16_model_and_accurate_at_long_positions():
    model = build_model("debug", torch.bfloat16, max_seq_len=4096)
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    assert model.output.weight.dtype == torch.bfloat16
    # Position 4000 at the fastest frequency: the angle is 4000 rad; in bf16 it would be off by up to 8 rad.
    assert abs(model.rope_cos[4000, 0].item() - math.cos(4000.0)) < 1e-3


def test_rotation_is_applied_in_fp32_and_rounded_once():
    torch.manual_seed(0)
    cos, sin = precision.rope_cos_sin(64, 512, 500000.0)
    x = torch.randn(2, 512, 4, 64).bfloat16()
    out = precision.apply_rotary(x, cos, sin)
    assert out.dtype == torch.bfloat16
    ref = precision.apply_rotary(x.double(), cos.double(), sin.double())
    # Rounded once from an exact rotation: at most half a bf16 ulp from the float64 result.
    err = (out.double() - ref).abs()
    assert (err <= 0.5 * _ulp_bf16(ref) + 1e-6).all()  # + fp32 arithmetic error
    # Rotation in bf16 (cos/sin and products rounded) is visibly worse: the island matters.
    xb = x.unflatten(-1, (-1, 2))
    c, s = cos.bfloat16()[None, :, None], sin.bfloat16()[None, :, None]
    bf16 = torch.stack((xb[..., 0] * c - xb[..., 1] * s, xb[..., 0] * s + xb[..., 1] * c), -1).flatten(-2)
    assert (bf16.double() - ref).abs().mean() > 1.3 * err.mean()


def test_rms_norm_statistics_in_fp32():
    torch.manual_seed(0)
    x = (torch.randn(4, 4096) * 3 + 1).bfloat16()
    w = torch.ones(4096, dtype=torch.bfloat16)
    out = precision.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    # One rounding of the normalized value (fp32 statistics) and one of the product with w.
    assert ((out.double() - ref).abs() <= _ulp_bf16(ref) + 1e-30).all()
    # The same statistics accumulated in bf16 drift by far more than an ulp.
    naive = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert ((naive.double() - ref).abs() > _ulp_bf16(ref)).any()


def test_sdpa_accumulates_softmax_in_fp32_for_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1024, 64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    out = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    # Only the inputs' and the output's bf16 rounding: well under 2% relative error on the output scale.
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 0.02
    # A softmax and weighted sum accumulated in bf16 is measurably worse.
    s = (q.bfloat16() @ k.bfloat16().transpose(-1, -2)) / 8
    s = s.masked_fill(torch.ones(1024, 1024, dtype=torch.bool).triu(1), float("-inf"))
    naive = torch.softmax(s, -1) @ v.bfloat16()
    assert (naive.double() - ref).abs().max() / ref.abs().max() > err


def test_loss_upcasts_logits_and_returns_fp32():
    torch.manual_seed(0)
    logits = (torch.randn(8, 128, 259) * 4).bfloat16()
    labels = torch.randint(0, 259, (8, 128))
    loss = precision.cross_entropy(logits, labels)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.double().flatten(0, 1), labels.flatten())
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-6
    bf16_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert abs(bf16_loss.item() - ref.item()) / ref.item() > 1e-4  # why the island exists


def test_model_output_stays_in_compute_dtype():
    model = build_model("debug", torch.bfloat16)
    assert model(torch.randint(0, 259, (1, 8))).dtype == torch.bfloat16


def test_sampling_probabilities_are_computed_in_fp32_from_bf16_logits():
    """Island 8: generate's temperature softmax and top-p from a bf16 model's logits, in fp32."""
    logits = (torch.randn(259, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    probs = precision.sampling_probs(logits, 0.7)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.softmax(logits.float() / 0.7, dim=-1))
    in_bf16 = torch.softmax(logits / 0.7, dim=-1)  # the island removed: probabilities rounded to 8 bits
    assert ((in_bf16.double() - probs.double()).abs() / probs.double()).max() > 1e-3


def test_grad_norm_accumulates_in_fp32():
    # 1000 gradients of 7 elements of 1/3 each: the exact norm is sqrt(7000)/3.
    params = [torch.zeros(7, dtype=torch.bfloat16, requires_grad=True) for _ in range(1000)]
    for p in params:
        p.grad = torch.full((7,), 1 / 3, dtype=torch.bfloat16)
    exact = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in params))
    norm = precision.clip_grad_norm_(params, max_norm=0)
    assert norm.dtype == torch.float32
    assert abs(norm.item() - exact) / exact < 1e-6
    # torch's clip_grad_norm_ returns per-tensor norms in the grads' dtype: off by a bf16 rounding.
    bf16 = torch.nn.utils.clip_grad_norm_(params, max_norm=1e9)
    assert abs(bf16.double().item() - exact) / exact > 1e-4


def test_clipping_scales_to_max_norm():
    params = [torch.zeros(3, requires_grad=True)]
    params[0].grad = torch.tensor([3.0, 4.0, 0.0])
    norm = precision.clip_grad_norm_(params, max_norm=1.0)
    assert norm.item() == 5.0
    assert torch.allclose(params[0].grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)


def test_init_draws_in_fp32_so_recipes_share_weights():
    a = build_model("debug", torch.float32, seed=3)
    b = build_model("debug", torch.bfloat16, seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa.bfloat16(), pb), name


def test_autocast_only_for_bf16_mixed():
    from leantrain.config import load_config
    from leantrain.runplan import precision_of

    dev = torch.device("cpu")
    assert isinstance(precision_of(load_config(None, {"recipe": "bf16-mixed"})).autocast(dev), torch.autocast)
    for r in ("fp32", "bf16", "bf16-sr"):
        assert not isinstance(precision_of(load_config(None, {"recipe": r})).autocast(dev), torch.autocast)


def test_qwen3_qk_norms_are_fp32_islands_in_a_bf16_model():
    """Qwen3's per-head q/k RMSNorms are the same island as the block norms: statistics in fp32, one rounding."""
    from leantrain.model import ModelArgs, build_model_from_args

    args = ModelArgs(
        dim=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=50, head_dim=128, qk_norm=True
    )
    model = build_model_from_args(args, torch.bfloat16, seed=0)
    attn = model.layers[0].attention
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.ones(128))
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0], out=out))
    model(torch.randint(0, 50, (2, 64)))
    x, out = seen["x"], seen["out"]
    assert x.dtype == out.dtype == torch.bfloat16 and x.shape[-1] == 128  # per head
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + args.norm_eps)
    assert ((out.double() - ref).abs() <= _ulp_bf16(ref) + 1e-30).all()
    naive = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps)  # the island removed
    assert ((naive.double() - ref).abs() > _ulp_bf16(ref)).any()


def _linear_ce_case(dtype, n=96, dim=32, vocab=1000):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::7] = precision.IGNORE_INDEX  # prompt tokens
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_cross_entropy_equals_the_full_logits_loss(dtype):
    """Island 4 without the full logits: loss within fp32 rounding of the unchunked loss, gradients within the
    compute dtype's rounding (fp32: fp32 rounding; bf16: the weight gradient rounded once, as unchunked, the
    hidden gradient summed over chunks in fp32)."""
    results = []
    for chunk in (1000, 128):  # one chunk (the full logits) and 8 chunks, the last one short
        hidden, weight, labels = _linear_ce_case(dtype)
        loss = precision.linear_cross_entropy(hidden, weight, labels, chunk=chunk)
        loss.backward()
        results.append((loss, hidden.grad, weight.grad))
    (loss, gh, gw), (chunked, ch, cw) = results
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - loss.item()) <= 4 * torch.finfo(torch.float32).eps * loss.item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for full, part in ((gh, ch), (gw, cw)):
        assert part.dtype == dtype
        assert (part.float() - full.float()).abs().max() <= tol * full.float().abs().max()


def test_chunked_linear_cross_entropy_never_holds_the_full_logits():
    """No tensor as large as the logits is made, in the forward or the backward (every op's output is
    checked), and what the backward keeps is the inputs and one fp32 number per token."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, weight, labels = _linear_ce_case(torch.bfloat16, n=64, vocab=2048)
    largest = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            largest.extend(t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with Sizes():
        loss = precision.linear_cross_entropy(hidden, weight, labels, chunk=256)
        loss.backward()
    # a [64, 256] chunk of the logits at most, or the output matrix's gradient (2048 x 32); never [64, 2048]
    assert weight.numel() < 64 * 2048
    assert all(n <= 64 * 256 or n == weight.numel() for n in largest)
    assert hidden.grad is not None and weight.grad is not None


def test_model_loss_is_the_loss_of_its_logits():
    """Transformer(tokens, labels=...) (training, evaluation) equals the loss of Transformer(tokens)'s logits."""
    model = build_model("debug", torch.float32)
    tokens = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = tokens.roll(-1, 1)
    assert torch.allclose(
        model(tokens, labels=labels), precision.cross_entropy(model(tokens), labels), rtol=1e-6, atol=0
    )
