"""data.packing: best-fit packing, positions restarting per sample, attention confined to each sample, the same
loss as padded rows, resume, and train / eval / compare on chat data."""

import json
import math
import time

import numpy as np
import pytest
import torch

from leantrain.cli import main
from leantrain.config import load_config
from leantrain.data import (
    ByteTokenizer,
    PackedSftDataset,
    SftDataset,
    TokenizedSamples,
    best_fit_pack,
    build_datasets,
    record_sample,
)
from leantrain.errors import ConfigError, DataError
from leantrain.metrics import read_metrics
from leantrain.model import build_model, segment_mask
from leantrain.precision import IGNORE_INDEX, cross_entropy

BYTE = ByteTokenizer()


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [("q" * int(rng.integers(1, 12)) + f"{i}? ", "a" * int(rng.integers(1, 20)) + f"{i}.") for i in range(n)]


def test_best_fit_pack_fills_bins_within_capacity_and_deterministically():
    rng = np.random.default_rng(0)
    sizes = np.minimum(rng.lognormal(3.5, 0.8, 5000).astype(np.int64) + 1, 256)
    bins = best_fit_pack(sizes, 256)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))  # every item once
    assert all(sizes[b].sum() <= 256 for b in bins)
    lower = math.ceil(sizes.sum() / 256)
    assert len(bins) <= 1.02 * lower + 1, (len(bins), lower)  # best-fit decreasing is near optimal here
    assert bins == best_fit_pack(sizes.copy(), 256)
    assert best_fit_pack(np.array([3, 5, 2, 4, 6]), 8) == [[4, 2], [1, 0], [3]]  # hand-checked: 6+2, 5+3, 4


def test_best_fit_pack_is_fast_for_many_samples():
    sizes = np.random.default_rng(1).integers(1, 2048, 300_000)
    start = time.perf_counter()
    bins = best_fit_pack(sizes, 2048)
    assert time.perf_counter() - start < 10 and sum(len(b) for b in bins) == len(sizes)


def test_packed_rows_restart_positions_at_each_sample_and_keep_every_label():
    pairs = _pairs(30)
    packed = PackedSftDataset(pairs, BYTE, seq_len=64, batch_size=100, seed=0, shuffle=False)
    padded = SftDataset(pairs, BYTE, seq_len=64, batch_size=100, seed=0, shuffle=False)
    assert packed.num_rows < padded.num_samples / 2 and packed.num_tokens == padded.num_tokens
    inputs, labels, positions = next(packed.eval_batches())
    _, padded_labels = next(padded.eval_batches())
    assert sorted(labels[labels != IGNORE_INDEX].tolist()) == sorted(
        padded_labels[padded_labels != IGNORE_INDEX].tolist()
    )
    for r, row in enumerate(packed.rows):
        starts = np.cumsum([0] + [int(packed.lengths[k]) - 1 for k in row])
        for k, a, b in zip(row, starts[:-1], starts[1:]):
            prompt, response = pairs[k]
            assert positions[r, a:b].tolist() == list(range(b - a))
            assert inputs[r, a:b].tolist() == [256, *prompt.encode(), *response.encode()]
            assert labels[r, a:b].tolist() == [IGNORE_INDEX] * len(prompt) + [*response.encode(), 257]
        tail = positions[r, starts[-1] :]
        assert tail.tolist() == list(range(len(tail))) and (labels[r, starts[-1] :] == IGNORE_INDEX).all()


def test_segment_mask_is_block_diagonal_causal():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = segment_mask(positions, window=0)[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    windowed = segment_mask(positions, window=2)[0, 0].int()
    assert windowed[2].tolist() == [0, 1, 1, 0, 0, 0]


def _train_like_loss(model, batch):
    """The first step's loss and gradient of one batch covering every sample."""
    model.zero_grad()
    logits = model(batch[0], positions=batch[2]) if len(batch) > 2 else model(batch[0])
    loss = cross_entropy(logits, batch[1])
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_packed_and_padded_give_the_same_first_step_loss_and_gradient():
    pairs = _pairs(24, seed=3)
    packed = PackedSftDataset(pairs, BYTE, seq_len=96, batch_size=24, seed=0, shuffle=False)
    padded = SftDataset(pairs, BYTE, seq_len=96, batch_size=24, seed=0, shuffle=False)
    model = build_model("debug", torch.float32, seed=1, max_seq_len=96)
    loss_packed, grad_packed = _train_like_loss(model, next(packed.eval_batches()))
    loss_padded, grad_padded = _train_like_loss(model, next(padded.eval_batches()))
    assert loss_packed == pytest.approx(loss_padded, rel=1e-6, abs=0)
    assert torch.allclose(grad_packed, grad_padded, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("window", [0, 5])
def test_changing_one_sample_of_a_packed_row_leaves_the_others_alone(window):
    model = build_model("debug", torch.float32, seed=2, max_seq_len=64, sliding_window=window)
    pairs = [("first prompt ", "first answer"), ("second ", "two"), ("third one ", "three")]
    changed = [pairs[0], ("SECOND, longer ", "TWO!"), pairs[2]]
    rows = []
    for ps in (pairs, changed):
        data = PackedSftDataset(ps, BYTE, seq_len=64, batch_size=1, seed=0, shuffle=False)
        assert data.num_rows == 1
        rows.append((data, next(data.eval_batches())))
    with torch.no_grad():
        out = [model(b[0], positions=b[2])[0] for _, b in rows]
    for (data, batch), logits in zip(rows, out):  # each sample computes what it computes alone
        at = 0
        for k in data.rows[0]:
            n = int(data.lengths[k]) - 1
            alone = model(batch[0][:, at : at + n])[0]
            assert torch.allclose(logits[at : at + n], alone, atol=1e-5)
            at += n
    spans = [
        {
            k: (sum(int(d.lengths[j]) - 1 for j in d.rows[0][: d.rows[0].index(k)]), int(d.lengths[k]) - 1)
            for k in d.rows[0]
        }
        for d, _ in rows
    ]
    for k in (0, 2):  # the unchanged samples: identical logits wherever they sit in the row
        (a0, n0), (a1, n1) = spans[0][k], spans[1][k]
        assert n0 == n1 and torch.allclose(out[0][a0 : a0 + n0], out[1][a1 : a1 + n1], atol=1e-5)
    (a0, n0), (a1, _) = spans[0][1], spans[1][1]
    assert not torch.allclose(out[0][a0 : a0 + 3], out[1][a1 : a1 + 3], atol=1e-3)  # the changed one did change


def test_packed_order_resumes_and_a_padded_checkpoint_is_refused():
    pairs = _pairs(40)
    a = PackedSftDataset(pairs, BYTE, seq_len=64, batch_size=2, seed=5)
    for _ in range(3):
        a.next_batch()
    b = PackedSftDataset(pairs, BYTE, seq_len=64, batch_size=2, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a.next_batch(), b.next_batch()))
    padded = SftDataset(pairs, BYTE, seq_len=64, batch_size=2, seed=5)
    with pytest.raises(DataError, match="padded rows, but this run has data.packing=true"):
        b.load_state_dict(padded.state_dict())
    with pytest.raises(DataError, match="packed rows, but this run has data.packing=false"):
        padded.load_state_dict(a.state_dict())


def test_packing_false_is_refused_for_text():
    with pytest.raises(ConfigError, match="data.packing=false applies to data.format='sft' or 'chat'"):
        load_config(None, {"data.packing": "false"})


def _chat_file(path, n=60):
    with open(path, "w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"what is {i} + {i}?"},
                {"role": "assistant", "content": f"{2 * i}" + " indeed" * (i % 3)},
            ]
            if i % 2:
                messages += [{"role": "user", "content": "sure?"}, {"role": "assistant", "content": "yes"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_chat_data_builds_packed_and_padded_datasets(tmp_path):
    path = _chat_file(tmp_path / "chat.jsonl")
    for packing, kind in (("true", PackedSftDataset), ("false", SftDataset)):
        cfg = load_config(
            None, {"data.format": "chat", "data.path": str(path), "data.seq_len": "256", "data.packing": packing}
        )
        train, held_out = build_datasets(cfg.data, BYTE, 0)
        assert isinstance(train, kind) and (train.num_samples, held_out.num_samples) == (57, 3)
        assert len(train.next_batch()) == (3 if packing == "true" else 2)
    # the held-out conversations' targets, all of them labels of the packed eval rows
    want = sum(
        int(record_sample(json.loads(line), "chat", BYTE)[1][1:].sum()) for line in path.read_text().splitlines()[-3:]
    )
    labels = torch.cat([batch[1] for batch in held_out.eval_batches()])
    assert int((labels != IGNORE_INDEX).sum()) == want


def test_train_eval_and_compare_on_chat_data(tmp_path, capsys):
    path = _chat_file(tmp_path / "chat.jsonl")
    args = [
        "--data.format=chat",
        f"--data.path={path}",
        "--model.flavor=debug",
        "--compile.enable=false",
        "--data.seq_len=256",
        "--data.local_batch_size=2",
        "--training.steps=3",
        "--lr_scheduler.warmup_steps=1",
        "--metrics.log_freq=1",
        "--metrics.progress=false",
    ]
    run = tmp_path / "run"
    assert main(["train", *args, "--checkpoint.enable=true", f"--job.dump_folder={run}"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records) and "eval_loss" in records[-1]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    # the held-out split is the last 3 conversations; their targets are the assistant turns and their EOS
    want = sum(
        int(record_sample(json.loads(line), "chat", BYTE)[1].sum()) for line in path.read_text().splitlines()[-3:]
    )
    assert result["format"] == "chat" and result["tokens"] == want
    assert result["loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-5)
    assert main(["eval", "--checkpoint", str(run), f"--data.path={path}", "--out", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["split"] == "all"
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "fp32,bf16-sr", "--out", str(out), *args]) == 0
    summaries = json.loads((out / "summary.json").read_text())
    assert [s["recipe"] for s in summaries] == ["fp32", "bf16-sr"]
    assert all(math.isfinite(s["final_eval_loss"]) for s in summaries)


def test_tokenized_samples_are_what_record_sample_gives():
    pairs = [record_sample({"prompt": p, "response": r}, "sft", BYTE) for p, r in _pairs(5)]
    samples = TokenizedSamples.from_pairs(pairs)
    assert len(samples) == 5 and samples.lengths.tolist() == [len(i) for i, _ in pairs]
    for i, (ids, mask) in enumerate(pairs):
        got = samples.sample(i)
        assert np.array_equal(got[0], ids) and np.array_equal(got[1], mask)
