"""``leantrain generate`` and the model's KV cache: greedy decoding gives transformers' tokens, cached decoding
gives the logits of a full forward, sampling is seeded, and the command reads a run or an HF folder."""

import dataclasses

import pytest
import torch

import leantrain
from leantrain.cli import main
from leantrain.errors import ConfigError
from leantrain.generate import generate
from leantrain.model import KVCache, ModelArgs, build_model_from_args
from leantrain.precision import sampling_probs

ATOL = 1e-5  # fp32, the same network with differently ordered arithmetic (as in tests/test_hf.py)
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=50, max_seq_len=48)


def _model(seed=1, dtype=torch.float32, **changes):
    model = build_model_from_args(dataclasses.replace(ARGS, **changes), dtype, seed=seed)
    with torch.no_grad():  # weights large enough for varied logits (the init's 0.02 gives nearly uniform ones)
        for p in model.parameters():
            p.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(seed))
    return model


# ---- the KV cache ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [{}, {"sliding_window": 5}, {"qk_norm": True, "qkv_bias": True, "head_dim": 24}, {"n_kv_heads": 4}],
    ids=["gqa", "window", "qk_norm_bias", "mha"],
)
def test_cached_decoding_gives_the_logits_of_a_full_forward_at_every_step(changes):
    model = _model(**changes)
    tokens = torch.randint(0, 50, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = KVCache(model.args, 2, 30, torch.float32, torch.device("cpu"))
        chunks = [model(tokens[:, :7], cache, 0), model(tokens[:, 7:12], cache, 7)]  # a prefill, a chunk of 5
        chunks += [model(tokens[:, p : p + 1], cache, p) for p in range(12, 30)]  # then one position at a time
        cached = torch.cat(chunks, dim=1)
        for end in (7, 12, 20, 30):  # the full forward over each prefix: the same last logits
            assert (cached[:, end - 1] - model(tokens[:, :end])[:, -1]).abs().max() <= ATOL
        full = model(tokens)
    assert full.abs().max() > 0.3  # not a degenerate comparison
    assert (cached - full).abs().max() <= ATOL


def test_the_window_reaches_into_the_cache():
    """A decoded token does not see the cached positions outside its window, and does see those inside."""
    model = _model(sliding_window=4)
    tokens = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 50

    def decoded(t, prefill):
        with torch.no_grad():
            cache = KVCache(model.args, 1, 12, torch.float32, torch.device("cpu"))
            model(t[:, :prefill], cache, 0)
            return torch.cat([model(t[:, p : p + 1], cache, p) for p in range(prefill, 12)], dim=1)

    diff = (decoded(changed, 6) - decoded(tokens, 6)).abs().amax(-1)[0]  # positions 6..11
    # Two layers of a window of 4: position 2 reaches positions 2..8 (3 further per layer), none after.
    assert (diff[:3] > 1e-6).all() and (diff[3:] == 0).all()


def test_the_cache_is_in_the_models_dtype_and_a_bf16_model_decodes_in_bf16():
    model = _model(dtype=torch.bfloat16)
    cache = KVCache(model.args, 1, 10, torch.bfloat16, torch.device("cpu"))
    assert cache.k[0].shape == (1, 10, ARGS.n_kv_heads, ARGS.dim // ARGS.n_heads) and cache.k[0].dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]]), cache, 0).dtype == torch.bfloat16
    assert cache.k[1][0, :3].abs().sum() > 0 and cache.k[1][0, 3:].abs().sum() == 0
    ids = generate(model, [1, 2, 3], max_new_tokens=5)
    assert len(ids) == 5 and all(0 <= i < 50 for i in ids)
    assert sampling_probs(torch.zeros(50, dtype=torch.bfloat16), 1.0, 0.5).dtype == torch.float32  # island 8


def test_a_chunk_past_max_seq_len_is_refused_by_the_model():
    model = _model()
    cache = KVCache(model.args, 1, 48, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="49 tokens is longer than max_seq_len=48"):
        model(torch.tensor([[1, 2]]), cache, 47)


# ---- greedy decoding against transformers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, overrides",
    [("llama", {}), ("mistral", {"sliding_window": 8, "head_dim": 24})],
    ids=["llama", "mistral_window"],
)
def test_greedy_decoding_gives_transformers_tokens(tmp_path, family, overrides):
    pytest.importorskip("transformers")
    from test_hf import tiny_hf_model

    hf = tiny_hf_model(family, **overrides)
    hf.generation_config.eos_token_id = None  # as many tokens as asked, on both sides
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = leantrain.load_hf(tmp_path, dtype=torch.float32)
    assert ours.args.sliding_window == overrides.get("sliding_window", 0)
    prompt = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3)).tolist()[0]
    new = 24  # 12 + 24 positions: well past a window of 8
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new)
    want = want[0, len(prompt) :].tolist()
    got = generate(ours, prompt, max_new_tokens=new)
    assert len(want) == new and len(set(want)) > 3  # not a stuck loop of one token
    assert got == want
    if ours.args.sliding_window:  # the window, applied to the cache, decides some of these tokens
        ours.args.sliding_window = 0
        assert generate(ours, prompt, max_new_tokens=new) != want


# ---- sampling --------------------------------------------------------------------------------------------


def test_sampling_is_seeded_valid_and_a_tiny_nucleus_is_greedy():
    model, prompt = _model(), [3, 1, 4, 1, 5]
    first = generate(model, prompt, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert first == generate(model, prompt, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert len(first) == 20 and all(0 <= i < ARGS.vocab_size for i in first)
    others = [generate(model, prompt, max_new_tokens=20, temperature=1.0, seed=s) for s in range(1, 4)]
    assert any(o != first for o in others)  # the seed decides
    greedy = generate(model, prompt, max_new_tokens=20)
    assert greedy != first
    assert generate(model, prompt, max_new_tokens=20, temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_top_p_keeps_the_most_likely_tokens_until_their_mass_reaches_it():
    logits = torch.tensor([0.5, 0.2, 0.3, 0.0]).log()  # -inf for the last: never sampled
    assert torch.allclose(sampling_probs(logits, 1.0), torch.tensor([0.5, 0.2, 0.3, 0.0]))
    assert torch.allclose(sampling_probs(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.0, 0.375, 0.0]))
    assert torch.allclose(sampling_probs(logits, 1.0, top_p=0.85), torch.tensor([0.5, 0.2, 0.3, 0.0]))
    assert torch.equal(sampling_probs(logits, 1.0, top_p=0.1), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    cold = sampling_probs(logits, 0.1)
    assert cold[0] > 0.99  # a low temperature sharpens towards the greedy token


def test_generation_stops_at_eos_and_at_the_models_positions():
    model, prompt = _model(), [3, 1, 4]
    greedy = generate(model, prompt, max_new_tokens=10)
    stop = greedy.index(greedy[3])  # the first time the 4th token appears
    assert generate(model, prompt, max_new_tokens=10, eos_id=greedy[3]) == greedy[: stop + 1]
    # Without max_new_tokens: 64, or what the 48 positions leave after the prompt.
    assert len(generate(model, prompt)) == 45
    with pytest.raises(ConfigError, match=r"3 tokens and 46 new token\(s\) need 49 positions, but the model has 48"):
        generate(model, prompt, max_new_tokens=46)
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ConfigError):
            generate(model, prompt, **bad)


# ---- the command ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    assert (
        main(
            [
                "train",
                "--model.flavor=debug",
                "--compile.enable=false",
                "--data.seq_len=32",
                "--data.local_batch_size=2",
                "--training.steps=2",
                "--eval.steps=1",
                "--metrics.progress=false",
                f"--job.dump_folder={run}",
            ]
        )
        == 0
    )
    assert (run / "model").is_dir()  # checkpoints off: the final model/ folder
    return run


def test_generate_continues_a_prompt_with_a_runs_model(tiny_run, capsys):
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tiny_run), "--prompt", "Hello"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and out.endswith("\n")
    # The same text in Python: the run's byte tokenizer, BOS first, greedy, 64 new tokens (the default; the debug
    # flavor keeps its 256 positions whatever seq_len it trained on), in the run's bf16 (the default recipe).
    model, _ = leantrain.checkpoint.load_model(tiny_run)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    tok = leantrain.data.ByteTokenizer()
    prompt = [tok.bos_id, *tok.encode("Hello")]
    new = generate(model, prompt, eos_id=tok.eos_id)
    assert len(new) == 64 or new[-1] == tok.eos_id
    assert out == "Hello" + tok.decode(new) + "\n"
    # The model/ folder itself, and a seeded sample: the same text each time.
    sampled = [
        "generate",
        "--checkpoint",
        str(tiny_run / "model"),
        "--prompt=Hi",
        "--max_new_tokens=8",
        "--temperature",
        "0.8",
        "--top_p=0.9",
        "--seed=5",
    ]
    first, second = _stdout_twice(capsys, sampled)
    assert first == second and first.startswith("Hi")


def _stdout_twice(capsys, argv):
    """What two runs of the same command print."""
    outs = []
    for _ in range(2):
        capsys.readouterr()
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    return outs


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--prompt", "Hi"], "needs exactly one model"),
        (["--checkpoint", "{run}", "--model.hf_checkpoint={run}", "--prompt", "Hi"], "needs exactly one model"),
        (["--checkpoint", "{run}"], "needs --prompt TEXT"),
        (["--checkpoint", "{run}", "--prompt", "Hi", "--max_new_tokens=ten"], "--max_new_tokens='ten' is not a whole"),
        (["--checkpoint", "{run}", "--prompt", "Hi", "--temperature=-1"], "--temperature=-1.0: it must be 0"),
        (["--checkpoint", "{run}", "--prompt", "Hi", "--top_p=0"], "--top_p=0.0: it must be in (0, 1]"),
        (
            ["--checkpoint", "{run}", "--prompt", "Hello", "--max_new_tokens=251"],
            "The prompt's 6 tokens and 251 new token(s) need 257 positions, but the model has 256",
        ),
    ],
)
def test_bad_generate_options_exit_2_with_one_paragraph(tiny_run, capsys, argv, says):
    capsys.readouterr()
    assert main(["generate", *[a.replace("{run}", str(tiny_run)) for a in argv]]) == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert says in err and "Traceback" not in err and captured.out == ""


def test_generate_help_and_summary(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--max_new_tokens N" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out


def test_generate_with_an_hf_folder_and_its_own_tokenizer(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_data import _make_hf_tokenizer
    from test_hf import tiny_hf_model

    folder = tmp_path / "hf"
    tiny_hf_model(vocab_size=259).save_pretrained(folder, safe_serialization=True)
    # tokenizer.path=auto wants the folder's tokenizer.json: none there, exit 2; the byte tokenizer by name works
    assert main(["generate", f"--model.hf_checkpoint={folder}", "--prompt", "Hi", "--max_new_tokens=5"]) == 2
    assert "has no tokenizer.json" in " ".join(capsys.readouterr().err.split())
    assert (
        main(
            [
                "generate",
                f"--model.hf_checkpoint={folder}",
                "--tokenizer.path=byte",
                "--recipe=fp32",
                "--prompt",
                "Hi",
                "--max_new_tokens=5",
            ]
        )
        == 0
    )
    model = leantrain.load_hf(folder, dtype=torch.float32)
    assert (
        capsys.readouterr().out
        == "Hi"
        + leantrain.data.ByteTokenizer().decode(generate(model, [256, *b"Hi"], max_new_tokens=5, eos_id=257))
        + "\n"
    )
    _make_hf_tokenizer(folder / "tokenizer.json")  # 200 tokens: fits the 259 rows
    assert main(["generate", f"--model.hf_checkpoint={folder}", "--prompt", "hello world", "--max_new_tokens=6"]) == 0
    assert capsys.readouterr().out.startswith("hello world")
