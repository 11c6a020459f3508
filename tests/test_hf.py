"""Hugging Face folders in and out (llama, mistral, qwen2, qwen3), checked against transformers (a dev
dependency) on tiny random models that transformers builds here from config objects (nothing is downloaded).

Tolerance: leantrain and transformers compute the same fp32 network with differently ordered RoPE and
attention arithmetic, so logits agree to rounding, not bitwise: max |difference| <= 1e-5 for logits of
magnitude ~0.3-1, in every family (observed at most 1.2e-7 over 5 batches of 2 x 100 tokens: llama with an
explicit head_dim 1.2e-7, mistral with a sliding window of 16 1.2e-7, qwen2 tied with its q/k/v bias 1.0e-7,
qwen2 with a window on every layer 8.9e-8, qwen3 with its q/k norms and head_dim 24 8.9e-8).
"""

import dataclasses
import json
import math
import os

import pytest
import torch

import leantrain
from leantrain.cli import main
from leantrain.config import load_config
from leantrain.data import build_datasets, build_tokenizer
from leantrain.errors import CheckpointError
from leantrain.families import FAMILIES
from leantrain.hf import model_args_from_hf
from leantrain.metrics import read_metrics
from leantrain.model import num_params

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_hf_model(family="llama", **overrides):
    """A random model of a transformers family (LlamaForCausalLM, ...) small enough for a unit test, with every
    weight (norms and biases too) drawn large enough to give varied logits."""
    config = transformers.AutoConfig.for_model(
        family,
        **{
            "vocab_size": 300,
            "hidden_size": 64,
            "intermediate_size": 160,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            **overrides,
        },
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.parametrize("variant", ["one_file", "sharded_llama31_rope_tied"])
def test_hf_llama_loads_with_the_same_logits(tmp_path, variant):
    if variant == "one_file":
        hf = tiny_hf_model()
        hf.save_pretrained(tmp_path, safe_serialization=True)
        assert (tmp_path / "model.safetensors").exists()
    else:
        hf = tiny_hf_model(rope_scaling=LLAMA31_SCALING, tie_word_embeddings=True)
        hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = leantrain.load_hf(tmp_path, dtype=torch.float32)
    assert ours.args.tie_embeddings == (variant != "one_file")
    assert (ours.args.rope_scaling is not None) == (variant != "one_file")
    tokens = torch.randint(0, 300, (2, 100))  # past original_max_position_embeddings: the scaled frequencies matter
    with torch.no_grad():
        got = ours(tokens)
    want = hf_logits(hf, tokens)
    assert want.abs().max() > 0.3  # not a degenerate comparison
    assert (got - want).abs().max() <= ATOL


def test_bf16_load_casts_each_tensor_and_keeps_the_values(tmp_path):
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = leantrain.load_hf(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    hf_state = hf.state_dict()
    assert torch.equal(ours.tok_embeddings.weight, hf_state["model.embed_tokens.weight"].bfloat16())
    w2 = hf_state["model.layers.1.mlp.down_proj.weight"].bfloat16()
    assert torch.equal(ours.layers[1].feed_forward.w2.weight, w2)
    # q/k are the same rows in another order (the RoPE layout), nothing else
    q_hf = hf_state["model.layers.0.self_attn.q_proj.weight"].bfloat16()
    assert not torch.equal(ours.layers[0].attention.wq.weight, q_hf)
    assert torch.equal(ours.layers[0].attention.wq.weight.sort(0).values, q_hf.sort(0).values)


def test_pickle_weights_are_refused_with_a_conversion_hint(tmp_path):
    tiny_hf_model().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*save_pretrained.*safe_serialization=True"):
        leantrain.load_hf(tmp_path)


def test_mismatched_hf_folder_is_refused(tmp_path):
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="missing model.layers.2"):
        leantrain.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn"}}))
    with pytest.raises(CheckpointError, match="RoPE type 'yarn'"):
        leantrain.load_hf(tmp_path)


def test_save_hf_round_trips_through_transformers(tmp_path):
    model = leantrain.build_model("debug", dtype=torch.float32, seed=3, vocab_size=300, max_seq_len=128)
    leantrain.save_hf(model, tmp_path / "out")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        assert (model(tokens) - hf_logits(hf, tokens)).abs().max() <= ATOL
    with pytest.raises(CheckpointError, match="already holds a model"):
        leantrain.save_hf(model, tmp_path / "out")


def test_train_from_hf_then_export_loads_back_in_transformers(tmp_path, capsys):
    hf = tiny_hf_model(vocab_size=259)  # the byte tokenizer's size: this test trains it on bytes, by name
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    run = tmp_path / "run"
    args = [
        "--recipe=fp32",
        f"--model.hf_checkpoint={tmp_path / 'hf'}",
        "--compile.enable=false",
        "--tokenizer.path=byte",
        "--data.seq_len=32",
        "--data.local_batch_size=2",
        "--training.steps=2",
        "--lr_scheduler.warmup_steps=1",
        "--eval.steps=1",
        "--metrics.log_freq=1",
        "--metrics.progress=false",
        "--checkpoint.enable=true",
        f"--job.dump_folder={run}",
    ]
    assert main(["train", *args]) == 0
    # The first step's loss is the HF model's loss on the first batch: training started from its weights.
    cfg = load_config(None, {"data.seq_len": "32", "data.local_batch_size": "2"})
    inputs, labels = build_datasets(cfg.data, build_tokenizer("byte"), cfg.job.seed)[0].next_batch()
    want = torch.nn.functional.cross_entropy(hf_logits(hf, inputs).flatten(0, 1), labels.flatten())
    assert abs(read_metrics(run / "metrics.jsonl")[0]["loss"] - want.item()) < 1e-5

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    model, _ = leantrain.checkpoint.load_model(run)
    tokens = torch.randint(0, 259, (2, 32))
    with torch.no_grad():
        assert (model(tokens) - hf_logits(exported, tokens)).abs().max() <= ATOL
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["eos_token_id"] == 257 and config["torch_dtype"] == "float32"

    # leantrain eval on an HF folder: all of --data.path, JSON to --out
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                f"--model.hf_checkpoint={tmp_path / 'hf'}",
                f"--data.path={text}",
                "--data.seq_len=32",
                "--tokenizer.path=byte",
                "--recipe=fp32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    n_windows = (len(text.read_text()) + 2 - 1) // 32  # BOS + bytes + EOS, windows of 33 sharing one token
    assert result["split"] == "all" and result["tokens"] == n_windows * 32 and result["dtype"] == "float32"
    assert "perplexity" in capsys.readouterr().out
    assert os.path.exists(out)


def test_an_hf_model_trains_with_its_own_tokenizer_and_a_foreign_one_is_refused(tmp_path, capsys):
    from test_data import _make_hf_tokenizer

    folder = tmp_path / "hf"
    _make_hf_tokenizer(tmp_path / "tokenizer.json")
    size = len(json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"])
    rows = size + 300  # a padded embedding, as many checkpoints have: the folder's own tokenizer is smaller
    tiny_hf_model(vocab_size=rows).save_pretrained(folder, safe_serialization=True)
    args = [
        "--recipe=fp32",
        f"--model.hf_checkpoint={folder}",
        "--compile.enable=false",
        "--data.seq_len=16",
        "--data.local_batch_size=2",
        "--training.steps=1",
        "--eval.steps=1",
        "--metrics.progress=false",
    ]
    # no tokenizer.json in the folder: nothing to guess from, so no silent byte ids
    assert main(["train", *args, f"--job.dump_folder={tmp_path / 'a'}"]) == 2
    assert "has no tokenizer.json" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "a").exists()
    assert main(["eval", f"--model.hf_checkpoint={folder}", "--recipe=fp32"]) == 2  # eval reads the same way
    assert "has no tokenizer.json" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "tokenizer.json").rename(folder / "tokenizer.json")
    assert main(["train", *args, f"--job.dump_folder={tmp_path / 'b'}"]) == 0
    assert f'path = "{folder / "tokenizer.json"}"' in (tmp_path / "b" / "config.toml").read_text()
    capsys.readouterr()
    assert main(["train", *args, "--tokenizer.path=byte", f"--job.dump_folder={tmp_path / 'c'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has 259 tokens" in err and f"has {rows} embedding rows" in err and "not the model's tokenizer" in err


# ---- the Llama-shaped families: mistral, qwen2, qwen3 (and llama's own explicit head_dim) ---------------------

# variant -> (model_type, config overrides, what leantrain's ModelArgs must say). head_dim=24 is not
# hidden_size / num_attention_heads = 16 (as in Mistral-Nemo and Qwen3); the windows are shorter than the
# 100 tokens compared, so they matter.
FAMILY_VARIANTS = {
    "llama_head_dim": ("llama", {"head_dim": 24}, {"head_dim": 24}),
    "mistral_window": ("mistral", {"head_dim": 24, "sliding_window": 16}, {"head_dim": 24, "sliding_window": 16}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}, {"qkv_bias": True, "tie_embeddings": True}),
    "qwen2_window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 10, "max_window_layers": 0},
        {"qkv_bias": True, "sliding_window": 10},
    ),
    "qwen3": ("qwen3", {"head_dim": 24}, {"qk_norm": True, "head_dim": 24}),
}


def test_every_family_of_the_registry_has_a_variant_here():
    """Adding a family to leantrain.families.FAMILIES needs a variant in FAMILY_VARIANTS (this test fails until
    there is one), which the load, export and training tests below then run against transformers."""
    assert {family for family, _, _ in FAMILY_VARIANTS.values()} == set(FAMILIES)
    for family in FAMILIES.values():  # the registry names classes transformers has
        assert hasattr(transformers, family.architecture)


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_family_loads_with_the_same_logits(tmp_path, variant):
    family, overrides, expected = FAMILY_VARIANTS[variant]
    hf = tiny_hf_model(family, **overrides)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = leantrain.load_hf(tmp_path, dtype=torch.float32)
    assert ours.args.family == family
    assert (ours.args.qkv_bias, ours.args.qk_norm) == (FAMILIES[family].qkv_bias, FAMILIES[family].qk_norm)
    for key, value in expected.items():
        assert getattr(ours.args, key) == value, key
    tokens = torch.randint(0, 300, (2, 100))
    with torch.no_grad():
        got = ours(tokens)
    want = hf_logits(hf, tokens)
    assert want.abs().max() > 0.3  # not a degenerate comparison
    assert (got - want).abs().max() <= ATOL
    if ours.args.sliding_window:  # the window is applied, and it matters at this length
        ours.args.sliding_window = 0
        with torch.no_grad():
            assert (ours(tokens) - want).abs().max() > 100 * ATOL


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_family_save_hf_round_trips_through_transformers(tmp_path, variant):
    family, overrides, _ = FAMILY_VARIANTS[variant]
    hf = tiny_hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = leantrain.load_hf(tmp_path / "hf", dtype=torch.float32)
    leantrain.save_hf(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)  # the same model_type and architecture as the original
    # Every tensor back in HF's layout and order, bit for bit (q/k rows, biases and norm weights included).
    theirs, mine = hf.state_dict(), back.state_dict()
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)

    def shape_of(c):  # qwen2's config has no head_dim field: transformers then uses hidden / heads
        return (
            getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            getattr(c, "sliding_window", None),
            c.tie_word_embeddings,
        )

    assert shape_of(back.config) == shape_of(hf.config)
    tokens = torch.randint(0, 300, (2, 100))
    with torch.no_grad():
        assert (ours(tokens) - hf_logits(back, tokens)).abs().max() <= ATOL


@pytest.mark.parametrize("variant", ["mistral_window", "qwen2_tied", "qwen3"])
def test_family_trains_in_bf16_sr_and_exports_what_transformers_loads(tmp_path, variant):
    family, overrides, _ = FAMILY_VARIANTS[variant]
    hf = tiny_hf_model(family, **{**overrides, "vocab_size": 259})  # the byte tokenizer's size: trained on bytes
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    run = tmp_path / "run"
    # seq_len 32 is longer than mistral_window's window of 16: training uses the sliding window.
    args = [
        "--recipe=bf16-sr",
        f"--model.hf_checkpoint={tmp_path / 'hf'}",
        "--compile.enable=false",
        "--tokenizer.path=byte",
        "--data.seq_len=32",
        "--data.local_batch_size=2",
        "--training.steps=3",
        "--lr_scheduler.warmup_steps=1",
        "--eval.steps=1",
        "--metrics.log_freq=1",
        "--metrics.progress=false",
        "--checkpoint.enable=true",
        f"--job.dump_folder={run}",
    ]
    assert main(["train", *args]) == 0
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # The first step is the HF model's loss on the first batch (to bf16 rounding): training started from it.
    cfg = load_config(None, {"data.seq_len": "32", "data.local_batch_size": "2"})
    inputs, labels = build_datasets(cfg.data, build_tokenizer("byte"), cfg.job.seed)[0].next_batch()
    want = torch.nn.functional.cross_entropy(hf_logits(hf, inputs).flatten(0, 1), labels.flatten())
    assert abs(losses[0] - want.item()) < 0.02 * want.item()

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 0
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["model_type"] == family and config["torch_dtype"] == "bfloat16"
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    assert type(exported) is type(hf)
    model, _ = leantrain.checkpoint.load_model(run)
    assert model.args.family == family and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # The trained weights moved, and transformers computes what leantrain does with them (both in fp32).
    assert not torch.equal(exported.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    tokens = torch.randint(0, 259, (2, 32))
    with torch.no_grad():
        assert (model.float()(tokens) - hf_logits(exported, tokens)).abs().max() <= ATOL


def test_q_k_bias_and_norm_weights_are_reordered_like_their_rows(tmp_path):
    """The q/k biases (qwen2) and q/k norm weights (qwen3) are indexed by the rows that RoPE's layout reorders:
    loading moves them with the rows (their values stay the same multiset), and dropping that reordering would
    break the logits test above."""
    for family in ("qwen2", "qwen3"):
        hf = tiny_hf_model(family)
        hf.save_pretrained(tmp_path / family, safe_serialization=True)
        ours = leantrain.load_hf(tmp_path / family, dtype=torch.float32)
        attn, theirs = ours.layers[0].attention, hf.model.layers[0].self_attn
        pairs = (
            [(attn.wq.bias, theirs.q_proj.bias), (attn.wk.bias, theirs.k_proj.bias), (attn.wv.bias, theirs.v_proj.bias)]
            if family == "qwen2"
            else [(attn.q_norm.weight, theirs.q_norm.weight), (attn.k_norm.weight, theirs.k_norm.weight)]
        )
        for mine, hf_tensor in pairs:
            assert torch.equal(mine.sort().values, hf_tensor.detach().sort().values)
        if family == "qwen2":
            assert torch.equal(attn.wv.bias, theirs.v_proj.bias)  # v is not rotated: not reordered
            assert not torch.equal(attn.wq.bias, theirs.q_proj.bias)
        else:
            head = theirs.q_norm.weight.detach()  # per head: HF's (j, j + d/2) pairs become (2j, 2j + 1)
            half = head.shape[0] // 2
            assert torch.equal(attn.q_norm.weight, torch.stack((head[:half], head[half:]), -1).flatten())


# ---- published configs: parameter counts and plan, on the meta device ----------------------------------------

# config.json of published models (the keys that decide the shapes), as on the Hugging Face Hub, with the
# parameter count transformers itself builds on the meta device, and the figure the model card publishes.
PUBLISHED = {
    # Qwen2.5-7B: "Number of Parameters: 7.61B" (untied; q/k/v bias; use_sliding_window false)
    "Qwen2.5-7B": (
        {
            "model_type": "qwen2",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-06,
            "sliding_window": 131072,
            "use_sliding_window": False,
            "max_window_layers": 28,
            "hidden_act": "silu",
        },
        7_615_616_512,
    ),
    # Qwen2.5-0.5B: "0.49B" (tied embeddings)
    "Qwen2.5-0.5B": (
        {
            "model_type": "qwen2",
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-06,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "max_window_layers": 24,
            "hidden_act": "silu",
        },
        494_032_768,
    ),
    # Qwen3-8B: "Number of Parameters: 8.2B" (q/k norms, head_dim 128)
    "Qwen3-8B": (
        {
            "model_type": "qwen3",
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": False,
            "rope_theta": 1000000,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-06,
            "attention_bias": False,
            "sliding_window": None,
            "use_sliding_window": False,
            "max_window_layers": 36,
            "hidden_act": "silu",
        },
        8_190_735_360,
    ),
    # Qwen3-0.6B: "0.6B" (tied; head_dim 128 x 16 heads = 2048 != hidden_size 1024)
    "Qwen3-0.6B": (
        {
            "model_type": "qwen3",
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_theta": 1000000,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-06,
            "attention_bias": False,
            "sliding_window": None,
            "use_sliding_window": False,
            "max_window_layers": 28,
            "hidden_act": "silu",
        },
        596_049_920,
    ),
    # Mistral-7B-v0.1: "7.24B" (sliding window 4096)
    "Mistral-7B-v0.1": (
        {
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-05,
            "sliding_window": 4096,
            "hidden_act": "silu",
        },
        7_241_732_096,
    ),
    # Mistral-7B-v0.3: "7.25B" (vocabulary 32768, no window)
    "Mistral-7B-v0.3": (
        {
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32768,
            "tie_word_embeddings": False,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-05,
            "sliding_window": None,
            "hidden_act": "silu",
        },
        7_248_023_552,
    ),
    # Mistral-Nemo-Base-2407: "12B" (12.2B; head_dim 128 x 32 heads = 4096 != hidden_size 5120)
    "Mistral-Nemo-Base-2407": (
        {
            "model_type": "mistral",
            "hidden_size": 5120,
            "intermediate_size": 14336,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 131072,
            "tie_word_embeddings": False,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 1024000,
            "rms_norm_eps": 1e-05,
            "sliding_window": None,
            "hidden_act": "silu",
        },
        12_247_782_400,
    ),
}


def _published_folder(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PUBLISHED[name][0]))
    return folder


def _transformers_count(config: dict) -> int:
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())  # tied embeddings: one parameter, counted once


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_parameter_counts_on_the_meta_device(tmp_path, name):
    config, count = PUBLISHED[name]
    ours = leantrain.load_hf(_published_folder(tmp_path, name), torch.bfloat16, device="meta", weights=False)
    assert ours.tok_embeddings.weight.is_meta
    assert num_params(ours) == _transformers_count(config) == count
    assert ours.args.tie_embeddings == config["tie_word_embeddings"]


@pytest.mark.parametrize("name", ["Qwen2.5-7B", "Qwen3-8B", "Mistral-7B-v0.3"])
def test_plan_reads_a_published_config(tmp_path, capsys, name):
    config, count = PUBLISHED[name]
    folder = _published_folder(tmp_path, name)  # config.json only: plan needs no weights
    assert (
        main(
            [
                "plan",
                f"--model.hf_checkpoint={folder}",
                "--recipe=bf16-sr,fp32",
                "--data.seq_len=4096",
                "--data.local_batch_size=1",
                "--json",
            ]
        )
        == 0
    )
    p = json.loads(capsys.readouterr().out)
    assert p["num_params"] == count and p["model"] == f"{config['model_type']} {folder}"
    bf16_sr = p["recipes"]["bf16-sr"]["state_bytes_per_gpu"]
    assert bf16_sr["params"] == bf16_sr["grads"] == 2 * count
    assert p["recipes"]["fp32"]["state_bytes_per_gpu"]["params"] == 4 * count
    assert main(["plan", f"--model.hf_checkpoint={folder}", "--recipe=bf16-sr"]) == 0
    assert f"{config['model_type']} {folder}: {count:,} parameters" in capsys.readouterr().out


# ---- what is still refused, named ---------------------------------------------------------------------------

_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 128,
}

REFUSED = {
    "mixtral": ({**_LLAMA, "model_type": "mixtral", "num_local_experts": 8}, "mixture-of-experts"),
    "qwen3_moe": ({**_LLAMA, "model_type": "qwen3_moe"}, "mixture-of-experts"),
    "gemma2": ({**_LLAMA, "model_type": "gemma2"}, "Gemma's norms"),
    "phi3": ({**_LLAMA, "model_type": "phi3"}, "model_type='phi3'.*'llama', 'mistral', 'qwen2', 'qwen3'"),
    "experts_in_a_qwen2": ({**_LLAMA, "model_type": "qwen2", "num_experts": 4}, r"num_experts=4 \(mixture-of-experts"),
    "gelu": ({**_LLAMA, "hidden_act": "gelu_pytorch_tanh"}, "hidden_act='gelu_pytorch_tanh'"),
    "o_proj_bias": ({**_LLAMA, "model_type": "qwen3", "attention_bias": True}, "bias on o_proj"),
    "mlp_bias": ({**_LLAMA, "mlp_bias": True}, "mlp_bias=True"),
    "yarn": ({**_LLAMA, "model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
    "partial_rotary": ({**_LLAMA, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    "quantized": ({**_LLAMA, "quantization_config": {"quant_method": "awq"}}, "quantized weights"),
    "odd_head_dim": ({**_LLAMA, "head_dim": 25}, "even head_dim"),
    # A window on layer 1 only, shorter than the 128 trained positions: it would matter, and is not supported.
    "window_on_some_layers": (
        {**_LLAMA, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
        "sliding window of 16 tokens on 1 of the 2 layers",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_configs_are_refused_and_named(case):
    config, message = REFUSED[case]
    with pytest.raises(CheckpointError, match=message):
        model_args_from_hf(config)


def test_a_window_on_some_layers_loads_where_it_changes_nothing():
    config = REFUSED["window_on_some_layers"][0]
    assert model_args_from_hf(config, max_seq_len=16).sliding_window == 0  # no token has 16 before it
    args = model_args_from_hf({**config, "max_window_layers": 0}, max_seq_len=128)  # every layer: supported
    assert args.sliding_window == 16 and args.qkv_bias


def test_refused_folder_exits_2_with_the_reason(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(REFUSED["gemma2"][0]))
    (tmp_path / "tokenizer.json").write_text("{}")  # a real folder has one; the model is refused before it is read
    assert (
        main(
            [
                "train",
                f"--model.hf_checkpoint={tmp_path}",
                "--compile.enable=false",
                "--training.steps=1",
                "--lr_scheduler.warmup_steps=1",
                f"--job.dump_folder={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "model_type='gemma2'" in err and "Gemma's norms" in err and "Traceback" not in err
    assert not any((tmp_path / "run").rglob("*"))  # nothing written


def test_save_hf_refuses_a_model_its_family_cannot_hold(tmp_path):
    model = leantrain.build_model("debug", dtype=torch.float32, vocab_size=300)
    model.args = dataclasses.replace(model.args, qkv_bias=True)  # a llama with a bias: no such HF llama
    with pytest.raises(CheckpointError, match="cannot be written as a Hugging Face 'llama'.*qkv_bias"):
        leantrain.save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_keeps_the_models_own_positions_and_a_longer_seq_len_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    common = [
        "--model.flavor=debug",
        "--compile.enable=false",
        "--data.local_batch_size=2",
        "--training.steps=1",
        "--eval.steps=1",
        "--lr_scheduler.warmup_steps=1",
        "--metrics.progress=false",
    ]
    assert main(["train", *common, "--data.seq_len=32", f"--job.dump_folder={run}"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 256  # the debug flavor's, not the 32 it was trained on
    capsys.readouterr()
    assert main(["train", *common, "--data.seq_len=300", f"--job.dump_folder={tmp_path / 'long'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "data.seq_len = 300" in err and "256 positions" in err and not any((tmp_path / "long").rglob("*"))
    # an HF model's own max_position_embeddings (128 here) is its limit too, in train and in eval
    tiny_hf_model(vocab_size=259).save_pretrained(tmp_path / "tiny", safe_serialization=True)
    hf = [
        f"--model.hf_checkpoint={tmp_path / 'tiny'}",
        "--compile.enable=false",
        "--tokenizer.path=byte",
        "--data.seq_len=200",
    ]
    assert main(["train", *hf, "--training.steps=1", f"--job.dump_folder={tmp_path / 'hf-run'}"]) == 2
    assert "128 positions" in " ".join(capsys.readouterr().err.split())
    assert main(["eval", *hf]) == 2
    assert "128 positions" in " ".join(capsys.readouterr().err.split())
