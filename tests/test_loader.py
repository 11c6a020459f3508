"""One path for a model and its tokenizer (leantrain.loader): every command resolves them the same way, and the
byte tokenizer survives export so that a fine-tune from an exported folder needs no tokenizer flag."""

import json

import pytest
import torch

from leantrain.cli import COMMANDS, main
from leantrain.data import ByteTokenizer, build_tokenizer
from leantrain.data.tokenizer import BYTE_SPECIAL_TOKENS, byte_tokenizer_json
from leantrain.model import build_model
from leantrain.hf import save_hf

from conftest import TINY

transformers = pytest.importorskip("transformers")

TEXTS = [
    "plain ascii",
    "héllo wörld, 日本語, 🙂 and ∑",
    "  two  spaces\n\ttab\r\n",
    "",
    "".join(BYTE_SPECIAL_TOKENS) + " <s></s>",  # a text spelling the specials' names is bytes, not specials
    "\x00\x01\x7f control bytes",
]


def test_exported_byte_tokenizer_gives_leantrain_ids_in_transformers(tmp_path):
    save_hf(build_model("debug"), tmp_path, tokenizer=ByteTokenizer())
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), ByteTokenizer()
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (256, 257, 258)
    assert len(theirs) == ours.vocab_size
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False).input_ids == ids
        assert theirs(text).input_ids == [ours.bos_id] + ids  # BOS first, as leantrain's prompts and documents
        assert theirs.decode(ids) == ours.decode(ids) == text
    # leantrain reads the exported file back as the byte tokenizer itself (so prepared byte data still matches).
    assert isinstance(build_tokenizer(str(tmp_path)), ByteTokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 257, 258)


def test_another_small_tokenizer_json_is_not_taken_for_the_byte_one(tmp_path):
    spec = json.loads(byte_tokenizer_json())
    spec["added_tokens"][0]["content"] = "<bos>"  # one special renamed: a different tokenizer
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert not isinstance(tokenizer, ByteTokenizer) and tokenizer.bos_id == 256


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float() if hasattr(model, "config") else model(tokens).float()


def test_train_export_finetune_export_keeps_the_tokenizer_and_the_logits(tmp_path, capsys):
    """train -> export -> fine-tune from the export with no tokenizer flag -> export: transformers computes what
    leantrain does, and the tokenizer is the byte tokenizer all along."""
    common = [*TINY, "--recipe=fp32", "--training.steps=2", "--checkpoint.enable=true"]
    assert main(["train", *common, f"--job.dump_folder={tmp_path / 'run'}"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf1")]) == 0
    assert (
        main(["train", *common, f"--model.hf_checkpoint={tmp_path / 'hf1'}", f"--job.dump_folder={tmp_path / 'tuned'}"])
        == 0
    )
    config = (tmp_path / "tuned" / "config.toml").read_text()
    assert f'path = "{tmp_path / "hf1" / "tokenizer.json"}"' in config  # auto: the folder's own tokenizer
    assert main(["export", "--checkpoint", str(tmp_path / "tuned"), "--out", str(tmp_path / "hf2")]) == 0

    from leantrain.checkpoint import load_model

    ours, _ = load_model(tmp_path / "tuned")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32).eval()
    first = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf1", dtype=torch.float32).eval()
    tokens = torch.tensor([transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")("déjà vu, twice").input_ids])
    assert tokens[0, 0] == 256 and tokens.shape[1] == 1 + len("déjà vu, twice".encode())
    want = _logits(theirs, tokens)
    assert (_logits(ours, tokens) - want).abs().max() <= 1e-5
    assert (_logits(first, tokens) - want).abs().max() > 1e-4  # the fine-tune moved the weights


@pytest.fixture(scope="module")
def hf_without_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    save_hf(build_model("debug"), folder)  # no tokenizer given: no tokenizer.json
    return folder


@pytest.mark.parametrize("command", ["train", "eval", "generate", "compare"])
def test_every_command_decides_tokenizer_auto_the_same_way(command, hf_without_tokenizer, tmp_path, capsys):
    """An HF folder without tokenizer.json: every command that tokenizes refuses with the same message, which names
    'byte'; with --tokenizer.path=byte each of them runs. (plan reads only config.json: its vocabulary is there.)"""
    steps = [*TINY, "--training.steps=1", "--lr_scheduler.warmup_steps=1"]
    extra = {
        "train": [*steps, f"--job.dump_folder={tmp_path / 'run'}"],
        "eval": ["--eval.steps=1", "--data.seq_len=32", f"--out={tmp_path / 'eval.json'}"],
        "generate": ["--prompt=hi", "--max_new_tokens=2"],
        "compare": ["--recipes=fp32", f"--out={tmp_path / 'cmp'}", *steps],
    }[command]
    args = [command, f"--model.hf_checkpoint={hf_without_tokenizer}", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and "'byte'" in err
    if command != "compare":  # (compare's runs are subprocesses: tests/test_compare_plan.py runs them)
        assert main([*args, "--tokenizer.path=byte"]) == 0
    assert main(["plan", f"--model.hf_checkpoint={hf_without_tokenizer}", "--recipe=bf16"]) == 0


def test_eval_of_an_exported_folder_needs_no_tokenizer_flag(tmp_path, capsys):
    save_hf(build_model("debug"), tmp_path / "hf", tokenizer=ByteTokenizer())
    out = tmp_path / "eval.json"
    assert (
        main(
            ["eval", f"--model.hf_checkpoint={tmp_path / 'hf'}", "--eval.steps=1", "--data.seq_len=32", f"--out={out}"]
        )
        == 0
    )
    assert json.loads(out.read_text())["tokens"] > 0


def test_an_explicit_tokenizer_wins_and_a_size_mismatch_names_both_sizes(tmp_path, capsys):
    save_hf(build_model("debug"), tmp_path / "hf", tokenizer=ByteTokenizer())
    spec = json.loads(byte_tokenizer_json())
    spec["added_tokens"].append({**spec["added_tokens"][-1], "id": 259, "content": "<extra>"})
    (tmp_path / "other.json").write_text(json.dumps(spec))
    assert (
        main(
            [
                "generate",
                f"--model.hf_checkpoint={tmp_path / 'hf'}",
                f"--tokenizer.path={tmp_path / 'other.json'}",
                "--prompt=hi",
            ]
        )
        == 2
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "260 tokens" in err and "259" in err


def test_the_command_table_gives_help_dispatch_and_key_checks(capsys):
    for name, command in COMMANDS.items():
        assert main([name, "--help"]) == 0
        assert capsys.readouterr().out.strip() == command.help().strip()
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(f"  {name} " in top for name in COMMANDS)
    assert main(["export", "--checkpoint=x", "--out=y", "--training.steps=3"]) == 2
    assert "does not take --training.steps. It takes only --checkpoint and --out." in capsys.readouterr().err
    assert main(["generate", "--prompt=x", "--seed=two"]) == 2
    assert "--seed='two' is not a whole number" in capsys.readouterr().err
