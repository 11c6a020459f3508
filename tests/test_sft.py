"""SFT data: loss on the response only (checked by hand), padding without cross-sample attention, BOS/EOS, bad input."""

import json
import math

import pytest
import torch

from leantrain.cli import main
from leantrain.data import ByteTokenizer, SftDataset, build_tokenizer, load_sft_samples
from leantrain.errors import DataError
from leantrain.metrics import read_metrics
from leantrain.model import build_model
from leantrain.precision import cross_entropy

BYTE = ByteTokenizer()  # bytes 0..255, BOS 256, EOS 257, PAD 258


def test_labels_cover_the_response_and_eos_only():
    data = SftDataset([("ab", "cd")], BYTE, seq_len=8, batch_size=1, seed=0, shuffle=False)
    inputs, labels = next(data.eval_batches())
    assert inputs.tolist() == [[256, 97, 98, 99, 100, 257, 258, 258]]  # BOS a b c d EOS PAD PAD
    assert labels.tolist() == [[-100, -100, 99, 100, 257, -100, -100, -100]]  # c d EOS: the response and its end


def test_loss_ignores_prompt_tokens_against_a_hand_computed_loss():
    data = SftDataset([("ab", "cd")], BYTE, seq_len=8, batch_size=1, seed=0, shuffle=False)
    inputs, labels = next(data.eval_batches())
    model = build_model("debug", torch.float32, seed=1, max_seq_len=8)
    with torch.no_grad():
        logits = model(inputs)
        loss = cross_entropy(logits, labels).item()
    # By hand: the mean over the 3 response positions of log-sum-exp(logits) - logit of the right token.
    z = logits[0].double().tolist()
    by_hand = (
        sum(
            math.log(sum(math.exp(v) for v in z[j])) - z[j][target]
            for j, target in ((2, ord("c")), (3, ord("d")), (4, 257))
        )
        / 3
    )
    assert abs(loss - by_hand) < 1e-6
    all_tokens = cross_entropy(logits, inputs.roll(-1, 1)).item()  # what the loss would be on every position
    assert abs(all_tokens - by_hand) > 0.01


def test_a_padded_sample_sees_only_itself():
    data = SftDataset(
        [("hello ", "world"), ("a much longer prompt, ", "and its answer")],
        BYTE,
        seq_len=48,
        batch_size=2,
        seed=0,
        shuffle=False,
    )
    inputs, labels = next(data.eval_batches())
    model = build_model("debug", torch.float32, seed=1, max_seq_len=48)
    with torch.no_grad():
        batch = model(inputs)
        for row, (prompt, response) in enumerate([("hello ", "world"), ("a much longer prompt, ", "and its answer")]):
            n = 1 + len(prompt) + len(response) + 1
            alone = model(inputs[row : row + 1, :n])
            assert torch.allclose(batch[row, :n], alone[0], atol=1e-6)
            assert (labels[row, n - 1 :] == -100).all()  # no label on the padding


def _tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["what is two plus two", "four", "hello world"] * 10,
        trainer=trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]),
    )
    tok.save(str(path))


def test_hf_tokenizer_bos_eos_and_pad_are_used(tmp_path):
    _tokenizer_json(tmp_path / "tokenizer.json")
    tok = build_tokenizer(str(tmp_path))
    data = SftDataset([("what is two plus two", "four")], tok, seq_len=16, batch_size=1, seed=0, shuffle=False)
    inputs, labels = next(data.eval_batches())
    prompt, response = tok.encode("what is two plus two"), tok.encode("four")
    n = 1 + len(prompt) + len(response) + 1
    row = [tok.bos_id, *prompt, *response, tok.eos_id]
    assert inputs[0, :n].tolist() == row and (inputs[0, n:] == tok.pad_id).all()
    assert labels[0].tolist() == [-100] * len(prompt) + [*response, tok.eos_id] + [-100] * (16 - n + 1)


def test_long_samples_are_cut_or_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="1 sample.* cut .* and 1 whose prompt alone fills"):
        data = SftDataset(
            [("p", "r" * 20), ("q" * 20, "s"), ("x", "y")], BYTE, seq_len=8, batch_size=4, seed=0, shuffle=False
        )
    assert data.num_samples == 2
    inputs, labels = next(data.eval_batches())
    assert inputs[0].tolist() == [256, ord("p")] + [ord("r")] * 6 and labels[0, -1] == ord("r")


def test_position_resumes():
    samples = [(f"q{i} ", f"a{i}") for i in range(10)]
    a = SftDataset(samples, BYTE, seq_len=8, batch_size=3, seed=5)
    for _ in range(4):
        a.next_batch()
    b = SftDataset(samples, BYTE, seq_len=8, batch_size=3, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a.next_batch(), b.next_batch()))


@pytest.mark.parametrize(
    "bad, where",
    [
        ('{"prompt": "a", "response": "b"}\nnot json\n', ":2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', ':3: the record has no "response" field'),
        ('{"prompt": 1, "response": "b"}\n', ':1: "prompt" is a int'),
    ],
)
def test_bad_sft_lines_name_file_and_line(tmp_path, capsys, bad, where):
    path = tmp_path / "sft.jsonl"
    path.write_text(bad)
    with pytest.raises(DataError, match=f"sft.jsonl{where}"):
        load_sft_samples(str(path))
    assert (
        main(
            [
                "train",
                "--data.format=sft",
                f"--data.path={path}",
                "--model.flavor=debug",
                "--compile.enable=false",
                f"--job.dump_folder={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    assert f"sft.jsonl{where}" in " ".join(capsys.readouterr().err.split())


def test_sft_needs_jsonl_data(capsys):
    assert main(["train", "--data.format=sft", "--data.path=builtin"]) == 2
    assert "prompt" in capsys.readouterr().err


def test_train_and_eval_on_sft_data(tmp_path, capsys):
    path = tmp_path / "sft.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"Q: what is {i} plus {i}?\nA: ", "response": f"{2 * i}"}) + "\n")
    run = tmp_path / "run"
    args = [
        "--data.format=sft",
        f"--data.path={path}",
        "--model.flavor=debug",
        "--compile.enable=false",
        "--data.seq_len=32",
        "--data.local_batch_size=4",
        "--training.steps=4",
        "--lr_scheduler.warmup_steps=1",
        "--metrics.log_freq=1",
        "--eval.steps=1",
        "--metrics.progress=false",
        "--checkpoint.enable=true",
        f"--job.dump_folder={run}",
    ]
    assert main(["train", *args]) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records) and "eval_loss" in records[-1]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    # held-out split: the last 2 of 40 samples (38, 39); labels are their response digits and EOS
    assert result["format"] == "sft" and result["tokens"] == len("76") + 1 + len("78") + 1


def test_sft_loss_is_the_token_mean_of_the_global_batch_however_it_is_split(tmp_path):
    """Two samples with very different response lengths: one micro-batch of 2, or 2 accumulated micro-batches
    of 1, must train alike (the loss weighs every response token the same, not every micro-batch)."""
    path = tmp_path / "sft.jsonl"
    with open(path, "w") as f:
        for i in range(16):
            response = "7" if i % 2 else "the answer is a long sentence of many tokens"
            f.write(json.dumps({"prompt": f"Q{i}: ", "response": response}) + "\n")
    losses = {}
    for batch, accum in ((2, 1), (1, 2)):
        run = tmp_path / f"b{batch}"
        args = [
            "--data.format=sft",
            f"--data.path={path}",
            "--model.flavor=debug",
            "--compile.enable=false",
            "--data.seq_len=64",
            f"--data.local_batch_size={batch}",
            f"--training.gradient_accumulation_steps={accum}",
            "--training.steps=3",
            "--recipe=fp32",
            "--optimizer.lr=1e-3",
            "--lr_scheduler.warmup_steps=0",
            "--metrics.log_freq=1",
            "--eval.interval=0",
            "--eval.steps=1",
            "--metrics.progress=false",
            f"--job.dump_folder={run}",
        ]
        assert main(["train", *args]) == 0
        losses[accum] = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)


@pytest.mark.parametrize("fmt", ["sft", "text"])
def test_eval_loss_in_metrics_equals_leantrain_eval_on_the_same_checkpoint_and_split(tmp_path, capsys, fmt):
    """One evaluation function: training's eval_loss and `leantrain eval` agree to the last bit. The SFT split
    (10 samples of different lengths, in batches of 4, 4 and 2) is where a mean of batch means would differ."""
    path = tmp_path / "sft.jsonl"
    with open(path, "w") as f:
        for i in range(200):
            f.write(
                json.dumps({"prompt": f"Q: what is {i} times {i}? ", "response": f"{i * i}" + " ok" * (i % 5)}) + "\n"
            )
    data = [f"--data.path={path}", "--data.format=sft", "--data.seq_len=48"] if fmt == "sft" else ["--data.seq_len=32"]
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *data,
                "--model.flavor=debug",
                "--compile.enable=false",
                "--data.local_batch_size=4",
                "--training.steps=2",
                "--lr_scheduler.warmup_steps=1",
                "--eval.steps=3",
                "--metrics.progress=false",
                "--checkpoint.enable=true",
                f"--job.dump_folder={run}",
            ]
        )
        == 0
    )
    eval_loss = read_metrics(run / "metrics.jsonl")[-1]["eval_loss"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--eval.steps=3", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["batches"] == 3 and result["loss"] == eval_loss


def test_evaluate_is_the_token_mean_and_the_plain_mean_for_equal_counts():
    from leantrain.evaluation import evaluate
    from leantrain.precision import IGNORE_INDEX, Precision

    model = build_model("debug", torch.float32, seed=1, max_seq_len=16)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(3)]
    labels = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(3)]
    for lab, n in zip(labels, (3, 20, 9)):  # 29, 12 and 23 labelled tokens
        lab.view(-1)[:n] = IGNORE_INDEX
    fp32 = Precision(torch.float32, torch.float32, torch.float32)
    got = evaluate(model, zip(inputs, labels), fp32, torch.device("cpu"))
    with torch.no_grad():
        logits = torch.cat([model(x) for x in inputs])
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).double(), torch.cat(labels).flatten(), ignore_index=IGNORE_INDEX
    )
    assert got.tokens == 29 + 12 + 23 and got.batches == 3
    assert got.loss == pytest.approx(expected.item(), rel=1e-6)
    full = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(3)]
    plain = evaluate(model, zip(inputs, full), fp32, torch.device("cpu"))
    with torch.no_grad():  # equal counts: every weight is exactly 1, so bitwise the fp32 mean of the batch means
        means = [cross_entropy(model(x), y) for x, y in zip(inputs, full)]
    assert plain.tokens == 3 * 32 and plain.loss == ((means[0] + means[1] + means[2]) / 3).item()
