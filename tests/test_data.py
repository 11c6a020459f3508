"""Tests for leantrain.data: tokenizers, corpus loading, split, packing, order and resume."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from leantrain.data import (
    ByteTokenizer,
    PackedDataset,
    Tokenizer,
    build_tokenizer,
    load_documents,
    split_documents,
)
from leantrain.errors import DataError, UserError

# ---------------------------------------------------------------------------------------------
# Byte tokenizer
# ---------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_non_ascii():
    tok = build_tokenizer("byte")
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    text = "héllo wörld — ∑ 日本語 🚀\nnew line"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    # specials are dropped on decode
    assert tok.decode([256, *ids, 257, 258]) == text


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------


def test_builtin_corpus_loads_and_is_deterministic():
    docs = load_documents("builtin")
    assert sum(len(d.encode("utf-8")) for d in docs) > 300_000
    assert len(docs) > 20
    assert docs == load_documents("builtin")
    from pydoc_data.topics import topics

    assert docs[0] == topics[sorted(topics)[0]]


def test_builtin_byte_packing_is_fast():
    docs = load_documents("builtin")
    t0 = time.perf_counter()
    ds = PackedDataset(docs, ByteTokenizer(), seq_len=256, batch_size=8, seed=0)
    assert time.perf_counter() - t0 < 1.0
    assert ds.num_tokens == sum(len(d.encode("utf-8")) + 2 for d in docs)
    assert ds.tokens.dtype == torch.int32


def test_txt_is_one_document_when_small_and_split_at_blank_lines_when_long(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("para one\n\npara two\n", encoding="utf-8")
    assert load_documents(str(small)) == ["para one\n\npara two\n"]

    paragraphs = [f"paragraph {i} " + "x" * 990 for i in range(200)]  # ~200 KB
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(paragraphs), encoding="utf-8")
    docs = load_documents(str(big))
    assert 10 <= len(docs) <= 20
    # cuts happen only at paragraph breaks: joining the pieces back gives the file
    assert "\n\n".join(docs) == big.read_text(encoding="utf-8")
    assert all(d.startswith("paragraph ") for d in docs)


def test_jsonl_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.jsonl").write_text(
        json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth", "id": 1}) + "\n", encoding="utf-8"
    )
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "b" / "a.txt").write_text("second", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("ignored", encoding="utf-8")
    assert load_documents(str(tmp_path)) == ["first", "second", "third", "fourth"]
    assert load_documents(str(tmp_path / "b" / "z.jsonl")) == ["third", "fourth"]


def test_split_last_documents_are_eval_and_disjoint():
    docs = [f"doc {i}" for i in range(100)]
    train, ev = split_documents(docs)
    assert ev == docs[-5:]
    assert train == docs[:-5]
    assert not set(train) & set(ev)

    train, ev = split_documents(docs[:3])
    assert ev == ["doc 2"] and train == ["doc 0", "doc 1"]

    builtin = load_documents("builtin")
    train, ev = split_documents(builtin)
    assert ev == builtin[-len(ev) :] and len(ev) >= 1
    assert train + ev == builtin


def test_split_single_document_by_characters():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, ev = split_documents([text])
    assert train == [text[:950]] and ev == [text[950:]]
    with pytest.raises(DataError):
        split_documents([])


# ---------------------------------------------------------------------------------------------
# Packing, order, resume
# ---------------------------------------------------------------------------------------------


def test_packing_puts_bos_eos_between_documents_and_shifts_labels():
    tok = ByteTokenizer()
    docs = ["ab", "cde", "f"]
    ds = PackedDataset(docs, tok, seq_len=4, batch_size=2, seed=0, shuffle=False)
    expected = [256, 97, 98, 257, 256, 99, 100, 101, 257, 256, 102, 257]
    assert ds.tokens.tolist() == expected
    assert ds.num_tokens == 12 and ds.num_windows == (12 - 1) // 4
    x, y = ds.next_batch()
    assert x.dtype == torch.long and y.dtype == torch.long
    assert x.shape == y.shape == (2, 4)
    assert x.tolist() == [expected[0:4], expected[4:8]]
    assert y.tolist() == [expected[1:5], expected[5:9]]
    assert torch.equal(x[:, 1:], y[:, :-1])


class _NoBosTokenizer(ByteTokenizer):
    bos_id = None


def test_packing_without_bos():
    ds = PackedDataset(["ab", "c"], _NoBosTokenizer(), seq_len=2, batch_size=1, seed=0)
    assert ds.tokens.tolist() == [97, 98, 257, 99, 257]


def _take(ds, n):
    return [ds.next_batch() for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.fixture(scope="module")
def builtin_train():
    return split_documents(load_documents("builtin"))[0]


def test_same_seed_same_batches_different_seed_different(builtin_train):
    tok = ByteTokenizer()
    a = _take(PackedDataset(builtin_train, tok, 64, 4, seed=1), 5)
    b = _take(PackedDataset(builtin_train, tok, 64, 4, seed=1), 5)
    c = _take(PackedDataset(builtin_train, tok, 64, 4, seed=2), 5)
    assert _same(a, b)
    assert not _same(a, c)


def test_epochs_are_permutations_and_infinite():
    docs = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(40)) for i in range(5)]
    ds = PackedDataset(docs, ByteTokenizer(), seq_len=8, batch_size=3, seed=0)
    n = ds.num_windows
    seen = torch.cat([ds.next_batch()[0] for _ in range(n)])  # 3 epochs' worth of windows
    epochs = seen.view(3, n, 8)
    all_windows = ds.windows[:, :-1].long()
    for e in range(3):
        rows = sorted(map(tuple, epochs[e].tolist()))
        assert rows == sorted(map(tuple, all_windows.tolist()))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled per epoch
    assert ds.epoch == 3


def test_state_dict_resume_matches_uninterrupted(builtin_train):
    tok = ByteTokenizer()
    full = PackedDataset(builtin_train, tok, 512, 16, seed=3)
    ref = _take(full, 120)  # crosses an epoch boundary (~900 windows / 16 per batch)
    first = PackedDataset(builtin_train, tok, 512, 16, seed=3)
    _take(first, 50)
    sd = first.state_dict()
    sd = json.loads(json.dumps(sd))  # plain JSON-able values
    resumed = PackedDataset(builtin_train, tok, 512, 16, seed=3)
    resumed.load_state_dict(sd)
    assert _same(_take(resumed, 70), ref[50:])

    other = PackedDataset(builtin_train, tok, 256, 16, seed=3)
    with pytest.raises(DataError, match="seq_len"):
        other.load_state_dict(sd)


def test_ranks_see_disjoint_slices_of_the_global_batch():
    docs = ["x" * 50 + str(i) for i in range(10)]
    tok = ByteTokenizer()
    whole = PackedDataset(docs, tok, 8, 4, seed=0)
    r0 = PackedDataset(docs, tok, 8, 2, seed=0, rank=0, world_size=2)
    r1 = PackedDataset(docs, tok, 8, 2, seed=0, rank=1, world_size=2)
    for _ in range(5):
        x, _ = whole.next_batch()
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), x)


def test_eval_batches_fixed_in_order_and_limited():
    docs = ["abcdefghij" * 3, "klmnopqrst" * 3]
    ds = PackedDataset(docs, ByteTokenizer(), seq_len=8, batch_size=3, seed=0, name="eval")
    batches = list(ds.eval_batches(None))
    assert len(batches) == -(-ds.num_windows // 3)
    xs = torch.cat([x for x, _ in batches])
    assert torch.equal(xs, ds.windows[:, :-1].long())
    assert _same(batches, list(ds.eval_batches(None)))
    assert len(list(ds.eval_batches(1))) == 1
    ds.next_batch()
    assert _same(batches, list(ds.eval_batches(None)))  # training state does not matter


def test_too_short_corpus_for_seq_len():
    with pytest.raises(DataError) as e:
        PackedDataset(["hello"], ByteTokenizer(), seq_len=64, batch_size=1, seed=0, name="eval")
    msg = str(e.value)
    assert "7 tokens" in msg and "65" in msg and "data.seq_len" in msg and "eval" in msg


# ---------------------------------------------------------------------------------------------
# DataError cases
# ---------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
    assert issubclass(DataError, UserError)


@pytest.mark.parametrize("content", ["", "  \n\n\t \n"])
def test_empty_or_whitespace_file(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        load_documents(str(f))


def test_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:3") as e:
        load_documents(str(f))
    assert "not valid JSON" in str(e.value)


def test_jsonl_missing_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2.*\"text\"") as e:
        load_documents(str(f))
    assert "'body'" in str(e.value)
    f.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match="not a string"):
        load_documents(str(f))
    f.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="JSON object"):
        load_documents(str(f))


def test_unknown_extension(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\.csv"):
        load_documents(str(f))


def test_folder_without_data(tmp_path):
    (tmp_path / "readme.md").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match="no .txt, .jsonl or .parquet"):
        load_documents(str(tmp_path))


def test_unreadable_file(tmp_path, monkeypatch):
    f = tmp_path / "locked.txt"
    f.write_text("text", encoding="utf-8")

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError, match="locked.txt.*cannot be read"):
        load_documents(str(f))


def test_invalid_utf8_warns_once_and_replaces(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good \xff\xfe text \xc3")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        docs = load_documents(str(f))
    msgs = [str(x.message) for x in w if issubclass(x.category, UserWarning)]
    assert len(msgs) == 1 and "bad.txt" in msgs[0] and "UTF-8" in msgs[0]
    assert docs == ["good \ufffd\ufffd text \ufffd"]


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ---------------------------------------------------------------------------------------------


def _make_hf_tokenizer(path: Path, specials=("<s>", "</s>", "<pad>")) -> None:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers

    tok = HFTok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", *specials])
    tok.train_from_iterator(["hello world", "the quick brown fox", "jumps over the lazy dog"] * 10, trainer=trainer)
    tok.save(str(path))


def test_hf_tokenizer_json_loads_and_packs(tmp_path):
    p = tmp_path / "tokenizer.json"
    _make_hf_tokenizer(p)
    tok = build_tokenizer(str(p))
    assert isinstance(tok, Tokenizer)
    from tokenizers import Tokenizer as HFTok

    raw = HFTok.from_file(str(p))
    assert tok.bos_id == raw.token_to_id("<s>")
    assert tok.eos_id == raw.token_to_id("</s>")
    assert tok.pad_id == raw.token_to_id("<pad>")
    assert tok.vocab_size == raw.get_vocab_size()
    ids = tok.encode("hello world")
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids).replace(" ", "") == "helloworld"
    # a folder holding tokenizer.json works too
    assert build_tokenizer(str(tmp_path)).eos_id == tok.eos_id

    ds = PackedDataset(["hello world", "the lazy dog"], tok, seq_len=3, batch_size=1, seed=0, shuffle=False)
    t = ds.tokens.tolist()
    assert t[0] == tok.bos_id and t.count(tok.eos_id) == 2 and t[-1] == tok.eos_id
    assert t == [
        tok.bos_id,
        *tok.encode("hello world"),
        tok.eos_id,
        tok.bos_id,
        *tok.encode("the lazy dog"),
        tok.eos_id,
    ]


def test_hf_tokenizer_config_overrides_and_llama3_names(tmp_path):
    p = tmp_path / "tokenizer.json"
    _make_hf_tokenizer(p, specials=("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
    tok = build_tokenizer(str(p))
    from tokenizers import Tokenizer as HFTok

    raw = HFTok.from_file(str(p))
    assert tok.bos_id == raw.token_to_id("<|begin_of_text|>")
    assert tok.eos_id == raw.token_to_id("<|end_of_text|>")
    assert tok.pad_id == tok.eos_id  # no pad token -> EOS
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": {"content": "<|eot_id|>"}}), encoding="utf-8"
    )
    tok = build_tokenizer(str(p))
    assert tok.eos_id == raw.token_to_id("<|eot_id|>")
    assert tok.bos_id == raw.token_to_id("<|begin_of_text|>")  # null in config -> discovered
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}), encoding="utf-8")
    with pytest.raises(DataError, match="tokenizer_config.json"):
        build_tokenizer(str(p))


def test_hf_tokenizer_without_eos(tmp_path):
    p = tmp_path / "tokenizer.json"
    _make_hf_tokenizer(p, specials=())
    with pytest.raises(DataError, match="no end-of-text token"):
        build_tokenizer(str(p))


@pytest.mark.parametrize("content", ["this is not json", json.dumps({"hello": "world"})])
def test_not_a_tokenizer(tmp_path, content):
    p = tmp_path / "tokenizer.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="tokenizer.json"):
        build_tokenizer(str(p))
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer(str(tmp_path / "missing.json"))
