"""leantrain prepare and prepared data: the same batches as in-memory data, exact resume (of training and of an
interrupted prepare), rank slices, mixing by weight, and a clear exit 2 for every kind of damage."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch

from conftest import TINY
from leantrain import cli
from leantrain.config import load_config, parse_overrides
from leantrain.data import build_datasets, build_tokenizer, load_documents
from leantrain.data import datasets as datasets_module
from leantrain.data.prepared import ShardWriter, open_prepared, token_dtype
from leantrain.errors import DataError
from leantrain.metrics import read_metrics
from leantrain.prepare import prepare
from leantrain.runplan import resolve
from leantrain.train import train

WORDS = ["alpha", "beta", "gamma", "delta", "the", "list", "type", "é", "数据"]


def _write_corpus(folder, files=3, docs=80, seed=0):
    """A folder of .jsonl files, one .txt and one .parquet: every reader, and documents of varied length."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def doc():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))

    for i in range(files):
        lines = [json.dumps({"text": doc(), "id": j}) for j in range(docs)]
        lines.insert(5, "")  # blank lines and whitespace-only texts are skipped by both readers
        lines.insert(9, json.dumps({"text": "  \n"}))
        (folder / f"part-{i}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "notes.txt").write_text("\n\n".join(doc() for _ in range(200)), encoding="utf-8")
    pq.write_table(pa.table({"text": [doc() for _ in range(50)] + [None]}), folder / "z.parquet", row_group_size=16)
    return folder


def _data(path, *extra, seq_len=32, batch=4):
    return load_config(
        None,
        parse_overrides(
            [f"--data.path={path}", f"--data.seq_len={seq_len}", f"--data.local_batch_size={batch}", *extra]
        ),
    ).data


def _prepared(tmp_path, name="prep", source=None, **kw):
    source = source or _write_corpus(tmp_path / "src")
    out = tmp_path / name
    prepare(
        str(source),
        "byte",
        str(out),
        workers=2,
        progress_bar=False,
        **{"shard_tokens": 3000, "chunk_bytes": 2000, **kw},
    )
    return source, out


def _batches(data, n, **kw):
    train_ds, eval_ds = build_datasets(data, build_tokenizer("byte"), 0, tokenizer_path="byte", **kw)
    return train_ds, [train_ds.next_batch() for _ in range(n)], list(eval_ds.eval_batches())


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_prepared_folder_gives_the_same_batches_as_the_raw_files(tmp_path):
    source, out = _prepared(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 3 and manifest["dtype"] == "uint16"  # several shards, windows cross them
    raw_train, raw, raw_eval = _batches(_data(source, seq_len=512, batch=8), 50)
    prep_train, prep, prep_eval = _batches(_data(out, seq_len=512, batch=8), 50)
    assert prep_train.num_tokens == raw_train.num_tokens and prep_train.num_windows == raw_train.num_windows
    assert 50 * 8 > raw_train.num_windows  # the order crosses an epoch boundary too
    assert _equal(prep, raw) and _equal(prep_eval, raw_eval)
    docs = load_documents(str(source))
    assert manifest["documents"] == len(docs) and manifest["eval_documents"] == round(len(docs) * 0.05)


def test_rank_slices_are_disjoint_and_make_up_the_global_batch(tmp_path):
    _, out = _prepared(tmp_path)
    _, whole, _ = _batches(_data(out, batch=8), 5)
    _, rank0, _ = _batches(_data(out, batch=4), 5, rank=0, world_size=2)
    _, rank1, _ = _batches(_data(out, batch=4), 5, rank=1, world_size=2)
    for (x, _), (x0, _), (x1, _) in zip(whole, rank0, rank1):
        assert torch.equal(torch.cat([x0, x1]), x)
        assert not {tuple(r) for r in x0.tolist()} & {tuple(r) for r in x1.tolist()}


def test_a_batch_reads_only_its_own_windows(tmp_path, monkeypatch):
    _, out = _prepared(tmp_path)
    train_ds, _ = build_datasets(_data(out), build_tokenizer("byte"), 0, tokenizer_path="byte", rank=1, world_size=2)
    reads = []
    stream_getitem = type(train_ds.tokens).__getitem__
    monkeypatch.setattr(
        type(train_ds.tokens), "__getitem__", lambda self, s: reads.append(s) or stream_getitem(self, s)
    )
    train_ds.next_batch()
    assert len(reads) == 4 and all(s.stop - s.start == 33 for s in reads)  # this rank's 4 windows, nothing else


def test_dataset_state_resumes_exactly_on_prepared_data(tmp_path):
    _, out = _prepared(tmp_path)
    a, first, _ = _batches(_data(out), 7)
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(5)]
    b, _, _ = _batches(_data(out), 0)
    b.load_state_dict(state)
    assert _equal([b.next_batch() for _ in range(5)], rest)


@pytest.mark.parametrize("kind", ["prepared", "mix"])
def test_training_on_prepared_data_resumes_bit_for_bit(tmp_path, kind):
    _, out = _prepared(tmp_path)
    if kind == "mix":
        other = _prepared(tmp_path, "other", source=_uniform_corpus(tmp_path / "raw-other", "z"))[1]
        data = f"--data.mix={out}=2,{other}=1"
    else:
        data = f"--data.path={out}"
    args = [
        *TINY,
        "--data.seq_len=32",
        data,
        "--training.steps=4",
        "--metrics.log_freq=1",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        "--eval.interval=0",
    ]

    def run(folder, steps):
        train(
            resolve(
                load_config(None, parse_overrides([*args, f"--job.dump_folder={folder}", f"--training.steps={steps}"]))
            )
        )
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(folder / "metrics.jsonl")]

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 2)
    assert run(tmp_path / "cut", 4) == whole  # extended from its step-2 checkpoint


def test_an_interrupted_prepare_resumes_into_the_same_folder(tmp_path, monkeypatch):
    source, whole = _prepared(tmp_path, "whole")
    finish, calls = ShardWriter.finish, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C while the third shard is closed
        return finish(self)

    monkeypatch.setattr(ShardWriter, "finish", interrupted)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prepare(str(source), "byte", str(cut), workers=2, progress_bar=False, shard_tokens=3000, chunk_bytes=2000)
    names = sorted(os.listdir(cut))
    assert "manifest.json" not in names and ".progress.json" in names
    assert [n for n in names if n.endswith(".tokens")] == ["shard-00000.tokens", "shard-00001.tokens"]
    with pytest.raises(DataError, match="incomplete.*resumes"):
        open_prepared(cut)  # a folder without its manifest is never read as data
    monkeypatch.setattr(ShardWriter, "finish", finish)
    prepare(str(source), "byte", str(cut), workers=1, progress_bar=False, shard_tokens=3000, chunk_bytes=2000)
    assert sorted(os.listdir(cut)) == sorted(os.listdir(whole))
    for name in os.listdir(whole):
        if name != "manifest.json":
            assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    strip = lambda m: {k: v for k, v in m.items() if k != "run"}  # noqa: E731
    assert strip(json.loads((cut / "manifest.json").read_text())) == strip(
        json.loads((whole / "manifest.json").read_text())
    )


def test_a_stop_signal_keeps_the_finished_shards_and_the_same_command_resumes(tmp_path, monkeypatch, capfd):
    import signal

    source, whole = _prepared(tmp_path, "whole")
    finish, calls = ShardWriter.finish, []

    def signalled(self):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop, while the second shard closes
        return finish(self)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(ShardWriter, "finish", signalled)
    cut = tmp_path / "cut"
    try:
        assert (
            prepare(str(source), "byte", str(cut), workers=2, progress_bar=False, shard_tokens=3000, chunk_bytes=2000)
            is None
        )
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    out = capfd.readouterr()  # the signal's notice is written to fd 2 directly
    assert "SIGTERM received" in out.err and "2 finished shard(s) are kept" in out.out
    assert sorted(n for n in os.listdir(cut) if not n.startswith(".")) == [
        "shard-00000.index",
        "shard-00000.tokens",
        "shard-00001.index",
        "shard-00001.tokens",
    ]  # nothing half-written
    monkeypatch.setattr(ShardWriter, "finish", finish)
    prepare(str(source), "byte", str(cut), workers=2, progress_bar=False, shard_tokens=3000, chunk_bytes=2000)
    assert all((cut / n).read_bytes() == (whole / n).read_bytes() for n in os.listdir(whole) if n != "manifest.json")


def test_an_interrupted_prepare_of_a_changed_source_restarts(tmp_path, monkeypatch):
    source = _write_corpus(tmp_path / "src", files=2)
    finish, calls = ShardWriter.finish, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return finish(self)

    monkeypatch.setattr(ShardWriter, "finish", interrupted)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prepare(str(source), "byte", str(cut), workers=1, progress_bar=False, shard_tokens=3000, chunk_bytes=2000)
    monkeypatch.setattr(ShardWriter, "finish", finish)
    with open(source / "part-1.jsonl", "a") as f:  # the source changed since: the work done cannot be reused
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.warns(UserWarning, match="restarted from the beginning"):
        prepare(str(source), "byte", str(cut), workers=1, progress_bar=False, shard_tokens=3000, chunk_bytes=2000)
    _, fresh = _prepared(tmp_path, "fresh", source=source)
    assert sorted(os.listdir(cut)) == sorted(os.listdir(fresh))
    assert all((cut / n).read_bytes() == (fresh / n).read_bytes() for n in os.listdir(fresh) if n != "manifest.json")


def test_a_damaged_progress_record_is_refused(tmp_path, capsys):
    source = _write_corpus(tmp_path / "src", files=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".progress.json").write_text("{half")
    assert cli.main(["prepare", f"--data.path={source}", f"--out={out}", "--workers=1"]) == 2
    assert "is not readable JSON" in " ".join(capsys.readouterr().err.split())


def test_prepare_refuses_a_folder_holding_other_files_and_skips_a_finished_one(tmp_path, capsys):
    source, out = _prepared(tmp_path)
    before = (out / "manifest.json").read_bytes()
    prepare(str(source), "byte", str(out), workers=1, progress_bar=False, shard_tokens=3000, chunk_bytes=2000)
    assert "nothing to do" in capsys.readouterr().out and (out / "manifest.json").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert cli.main(["prepare", f"--data.path={source}", f"--out={other}"]) == 2
    assert "other files" in " ".join(capsys.readouterr().err.split()) and os.listdir(other) == ["keep.txt"]


def _damage_message(tmp_path, capsys, out):
    code = cli.main(
        [
            "train",
            *TINY,
            f"--data.path={out}",
            "--training.steps=1",
            "--lr_scheduler.warmup_steps=0",
            f"--job.dump_folder={tmp_path / 'run'}",
        ]
    )
    err = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert code == 2 and "Traceback" not in err
    return err


def test_each_kind_of_damage_stops_with_exit_2_and_a_clear_message(tmp_path, capsys):
    _, out = _prepared(tmp_path)
    tokens, index = out / "shard-00001.tokens", out / "shard-00001.index"
    good_tokens, good_index = tokens.read_bytes(), index.read_bytes()

    tokens.write_bytes(good_tokens[:-10])
    message = _damage_message(tmp_path, capsys, out)
    assert "shard-00001.tokens holds" in message and "truncated" in message and "prepare again" in message
    tokens.unlink()
    assert "shard-00001.tokens is missing" in _damage_message(tmp_path, capsys, out)
    tokens.write_bytes(good_tokens)
    offsets = np.frombuffer(good_index, dtype="<i8").copy()
    offsets[2], offsets[3] = offsets[3], offsets[2] - 1  # decreasing
    index.write_bytes(offsets.tobytes())
    assert "shard-00001.index is not a document index" in _damage_message(tmp_path, capsys, out)
    index.write_bytes(good_index[:-8])
    assert "shard-00001.index holds" in _damage_message(tmp_path, capsys, out)
    index.write_bytes(good_index)
    (out / "manifest.json").write_text("{not json")
    assert "manifest.json is not readable JSON" in _damage_message(tmp_path, capsys, out)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_manifest_of_another_tokenizer_is_refused_naming_both(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    source, out = _prepared(tmp_path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        load_documents(str(source)), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    code = cli.main(
        [
            "train",
            *TINY,
            f"--data.path={out}",
            f"--tokenizer.path={tmp_path / 'tokenizer.json'}",
            "--training.steps=1",
            "--lr_scheduler.warmup_steps=0",
            f"--job.dump_folder={tmp_path / 'run'}",
        ]
    )
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "tokenized with the byte tokenizer" in err and "tokenizer.json" in err and "sha256" in err


def test_prepare_with_a_bpe_tokenizer_matches_in_memory_encoding(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    source = _write_corpus(tmp_path / "src", files=1)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        load_documents(str(source)), trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    )
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    out = tmp_path / "prep"
    prepare(str(source), path, str(out), workers=2, progress_bar=False, chunk_bytes=1500)
    data_raw = load_config(
        None, parse_overrides([f"--data.path={source}", f"--tokenizer.path={path}", "--data.seq_len=16"])
    ).data
    data_prep = load_config(
        None, parse_overrides([f"--data.path={out}", f"--tokenizer.path={path}", "--data.seq_len=16"])
    ).data
    t = build_tokenizer(path)
    a = build_datasets(data_raw, t, 0, tokenizer_path=path)[0]
    b = build_datasets(data_prep, t, 0, tokenizer_path=path)[0]
    assert np.array_equal(b.tokens[0 : len(b.tokens)], a.tokens.numpy()) and b.tokens[0:1][0] == t.bos_id


def _uniform_corpus(folder, char, docs=40):
    folder.mkdir(parents=True)
    (folder / "d.jsonl").write_text("".join(json.dumps({"text": char * 50}) + "\n" for _ in range(docs)))
    return folder


def test_mixing_honours_the_weights_and_resumes(tmp_path):
    a = _prepared(tmp_path, "a", source=_uniform_corpus(tmp_path / "ra", "a"))[1]
    b = _prepared(tmp_path, "b", source=_uniform_corpus(tmp_path / "rb", "b"))[1]
    data = load_config(
        None, parse_overrides([f"--data.mix={a}=3,{b}=1", "--data.seq_len=16", "--data.local_batch_size=8"])
    ).data
    mixed, evals = build_datasets(data, build_tokenizer("byte"), 0, tokenizer_path="byte")
    batches = [mixed.next_batch()[0] for _ in range(100)]
    from_a = sum(int((x == ord("a")).any(dim=1).sum()) for x in batches)
    n, p = 800, 0.75
    assert abs(from_a / n - p) < 4 * math.sqrt(p * (1 - p) / n)  # within 4 standard errors of 3:1
    assert all(not ((x == ord("a")).any(dim=1) & (x == ord("b")).any(dim=1)).any() for x in batches)  # whole windows
    state = mixed.state_dict()
    after = [mixed.next_batch() for _ in range(3)]
    again = build_datasets(data, build_tokenizer("byte"), 0, tokenizer_path="byte")[0]
    again.load_state_dict(state)
    assert _equal([again.next_batch() for _ in range(3)], after)
    # Two ranks draw the same global batch and split it.
    r0 = build_datasets(data, build_tokenizer("byte"), 0, tokenizer_path="byte", rank=0, world_size=2)[0]
    whole = build_datasets(
        load_config(
            None, parse_overrides([f"--data.mix={a}=3,{b}=1", "--data.seq_len=16", "--data.local_batch_size=16"])
        ).data,
        build_tokenizer("byte"),
        0,
        tokenizer_path="byte",
    )[0]
    assert torch.equal(r0.next_batch()[0], whole.next_batch()[0][:8])
    assert sum(1 for _ in evals.eval_batches()) == 2  # each folder's eval split


def test_mix_settings_are_checked(tmp_path):
    from leantrain.errors import ConfigError

    with pytest.raises(ConfigError, match="both set"):
        load_config(None, parse_overrides(["--data.mix=a=1,b=2", "--data.path=x"]))
    with pytest.raises(DataError, match="not DIR=WEIGHT"):
        datasets_module.parse_mix("a=1,b")
    with pytest.raises(DataError, match="at least two"):
        datasets_module.parse_mix("a=1")


def test_large_raw_corpora_warn_that_prepare_exists(tmp_path, monkeypatch):
    source = _write_corpus(tmp_path / "src", files=1)
    monkeypatch.setattr(datasets_module, "RAW_WARN_BYTES", 1000)
    with pytest.warns(UserWarning, match="leantrain prepare"):
        build_datasets(_data(source), build_tokenizer("byte"), 0)


def test_parquet_text_field_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one doc", None, "  ", "two doc"], "n": [1, 2, 3, 4]}), tmp_path / "t.parquet")
    assert load_documents(str(tmp_path / "t.parquet"), "body") == ["one doc", "two doc"]
    with pytest.raises(DataError, match="no column 'text'.*body, n.*data.text_field"):
        load_documents(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match="holds int64, not strings"):
        load_documents(str(tmp_path / "t.parquet"), "n")


def test_a_bad_line_stops_prepare_naming_file_and_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)) + "{oops\n")
    assert cli.main(["prepare", f"--data.path={src}", f"--out={tmp_path / 'out'}", "--workers=1"]) == 2
    err = capsys.readouterr().err
    assert "a.jsonl:51: not valid JSON" in " ".join(err.split())
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(128256) == np.uint32


def test_eval_reads_a_prepared_folder_held_out_or_whole(tmp_path, capsys):
    source = tmp_path / "small"
    source.mkdir()
    (source / "d.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
    _, out = _prepared(tmp_path, source=source)
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                *TINY,
                "--data.seq_len=32",
                f"--data.path={out}",
                "--training.steps=2",
                "--eval.steps=3",
                "--checkpoint.enable=true",
                f"--job.dump_folder={run}",
            ]
        )
        == 0
    )
    eval_loss = read_metrics(run / "metrics.jsonl")[-1]["eval_loss"]
    assert cli.main(["eval", "--checkpoint", str(run), "--eval.steps=3", "--out", str(tmp_path / "held.json")]) == 0
    assert json.loads((tmp_path / "held.json").read_text())["loss"] == eval_loss  # the same split and batches
    assert cli.main(["eval", "--checkpoint", str(run), f"--data.path={out}", "--out", str(tmp_path / "all.json")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    result = json.loads((tmp_path / "all.json").read_text())
    assert result["split"] == "all" and result["tokens"] == (manifest["tokens"] - 1) // 32 * 32


# --------------------------------------------------------------------------------------------
# Prepared SFT and chat data
# --------------------------------------------------------------------------------------------


def _sft_source(folder, n=150):
    """Chat conversations in two .jsonl files and a .parquet, of varied lengths (some longer than a window)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(3)
    folder.mkdir(parents=True)

    def conversation(i):
        messages = [
            {
                "role": "user",
                "content": f"question {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))),
            },
            {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))},
        ]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "more?"}, {"role": "assistant", "content": "yes " * (i % 7)}]
        return messages

    for name in ("a", "b"):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(n))
        )
    pq.write_table(pa.table({"messages": [conversation(i) for i in range(40)]}), folder / "c.parquet", row_group_size=7)
    return folder


@pytest.mark.parametrize("packing", ["true", "false"])
def test_prepared_chat_gives_the_same_batches_as_the_raw_files(tmp_path, packing):
    source = _sft_source(tmp_path / "src")
    out = tmp_path / "prep"
    prepare(
        str(source), "byte", str(out), workers=2, progress_bar=False, shard_tokens=4000, chunk_bytes=3000, kind="chat"
    )
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) > 3
    extra = ["--data.format=chat", f"--data.packing={packing}"]
    with pytest.warns(UserWarning, match="cut at the end"):  # the same warnings: the samples are cut for the run
        raw_train, raw, raw_eval = _batches(_data(source, *extra, seq_len=320), 40)
    with pytest.warns(UserWarning, match="cut at the end"):
        prep_train, prep, prep_eval = _batches(_data(out, *extra, seq_len=320), 40)
    assert prep_train.state_dict() == raw_train.state_dict()  # same counts: samples, tokens, rows
    assert _equal(prep, raw) and _equal(prep_eval, raw_eval)
    assert len(raw[0]) == (3 if packing == "true" else 2)


def test_prepared_sft_data_is_checked_against_the_run(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "d.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i} ", "response": "a" * (i % 9 + 1)}) + "\n" for i in range(60))
    )
    out = tmp_path / "prep"
    assert cli.main(["prepare", f"--data.path={src}", "--data.format=sft", f"--out={out}", "--workers=1"]) == 0
    raw = _batches(_data(src, "--data.format=sft"), 3)
    prep = _batches(_data(out, "--data.format=sft"), 3)
    assert _equal(prep[1], raw[1]) and _equal(prep[2], raw[2])
    capsys.readouterr()
    assert (
        cli.main(
            [
                "train",
                *TINY,
                f"--data.path={out}",
                "--data.format=chat",
                "--training.steps=1",
                "--lr_scheduler.warmup_steps=0",
                f"--job.dump_folder={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    assert "prepared with data.format=sft" in " ".join(capsys.readouterr().err.split())
    (out / "shard-00000.mask").write_bytes((out / "shard-00000.mask").read_bytes()[:-3])
    code = cli.main(
        [
            "train",
            *TINY,
            f"--data.path={out}",
            "--data.format=sft",
            "--training.steps=1",
            "--lr_scheduler.warmup_steps=0",
            f"--job.dump_folder={tmp_path / 'run'}",
        ]
    )
    message = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "shard-00000.mask holds" in message and "truncated" in message


def test_first_targets_without_a_loop_equal_a_scan():
    from leantrain.data.datasets import TokenizedSamples

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(300):
        n = int(rng.integers(1, 12))
        mask = rng.random(n) < rng.choice([0.0, 0.2, 0.9])
        pairs.append((np.arange(n, dtype=np.int32), mask))
    samples = TokenizedSamples.from_pairs(pairs)
    naive = [next((j for j in range(1, len(m)) if m[j]), len(m)) for _, m in pairs]
    assert samples.first_targets.tolist() == naive
    part = samples.subset(100, 200)
    assert part.first_targets.tolist() == naive[100:200] and np.array_equal(part.sample(5)[1], pairs[105][1])
