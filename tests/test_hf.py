"""Hugging Face Llama folders in and out, checked against transformers (a dev dependency) on tiny random models.

Tolerance: leantrain and transformers compute the same fp32 network with differently ordered RoPE and
attention arithmetic, so logits agree to rounding, not bitwise: max |difference| <= 1e-5 for logits of
magnitude ~1 (observed ~1e-7).
"""

import json
import os

import pytest
import torch

import leantrain
from leantrain.cli import main
from leantrain.config import load_config
from leantrain.data import build_datasets, build_tokenizer
from leantrain.errors import CheckpointError
from leantrain.metrics import read_metrics

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}


def tiny_hf_model(**overrides):
    """A random LlamaForCausalLM small enough for a unit test, with weights large enough to give varied logits."""
    config = transformers.LlamaConfig(**{**dict(vocab_size=300, hidden_size=64, intermediate_size=160,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0),
                                         **overrides})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
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
    args = ["--recipe=fp32", f"--model.hf_checkpoint={tmp_path / 'hf'}", "--tokenizer.path=byte", "--data.seq_len=32",
            "--data.local_batch_size=2", "--training.steps=2", "--lr_scheduler.warmup_steps=1", "--eval.steps=1",
            "--metrics.log_freq=1", "--metrics.progress=false", "--checkpoint.enable=true", f"--job.dump_folder={run}"]
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
    assert main(["eval", f"--model.hf_checkpoint={tmp_path / 'hf'}", f"--data.path={text}", "--data.seq_len=32",
                 "--tokenizer.path=byte", "--recipe=fp32", "--out", str(out)]) == 0
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
    args = ["--recipe=fp32", f"--model.hf_checkpoint={folder}", "--data.seq_len=16", "--data.local_batch_size=2",
            "--training.steps=1", "--eval.steps=1", "--metrics.progress=false"]
    # no tokenizer.json in the folder: nothing to guess from, so no silent byte ids
    assert main(["train", *args, f"--job.dump_folder={tmp_path / 'a'}"]) == 2
    assert "has no tokenizer.json" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "a").exists()
    (tmp_path / "tokenizer.json").rename(folder / "tokenizer.json")
    assert main(["train", *args, f"--job.dump_folder={tmp_path / 'b'}"]) == 0
    assert f'path = "{folder / "tokenizer.json"}"' in (tmp_path / "b" / "config.toml").read_text()
    capsys.readouterr()
    assert main(["train", *args, "--tokenizer.path=byte", f"--job.dump_folder={tmp_path / 'c'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has 259 tokens" in err and f"has {rows} embedding rows" in err and "not the model's tokenizer" in err
