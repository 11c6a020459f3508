"""Useful SFT throughput, packed vs padded: labelled (target) tokens per second of `leantrain train`.

    python benchmarks/packing.py --out benchmarks/results/packing.json

The data: 4000 prompt/response samples (byte tokenizer, ASCII text, so a character is a token) whose lengths
(BOS + prompt + response + EOS) are lognormal with sigma 0.7 and a mean of 128 tokens, a quarter of
data.seq_len = 512 (clipped to 8..513, so none is cut), the prompt 40% of each sample. This is the shape of
instruction data: most samples short, a long tail. The model: the `small` Llama with 4 layers (dim 384, 6 heads,
7M parameters), fp32, local_batch_size 8, on the CPU.

Each run is `python -m leantrain train` in a fresh process (2 threads) for --steps steps, with data.packing
true or false; runs alternate (packed, padded, packed, ...) so a noisy neighbour slows both alike. The time is
metrics.jsonl's elapsed_s from step 5 to the last step (start-up and the first steps left out); the labelled
tokens of those steps are counted by replaying the same data order (build_datasets with the run's config).
Reported per run and as the median ratio packed / padded over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SEQ_LEN, BATCH, SAMPLES, MEAN_LEN, SIGMA, PROMPT_SHARE, FIRST = 512, 8, 4000, 128, 0.7, 0.4, 5
MODEL = ["--model.flavor=small", "--model.n_layers=4", "--recipe=fp32"]


def write_samples(path: str, seed: int = 0) -> dict:
    """The benchmark's jsonl; returns the length statistics it has."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mu = np.log(MEAN_LEN) - SIGMA**2 / 2  # the mean of a lognormal is exp(mu + sigma^2 / 2)
    lengths = np.clip(np.rint(rng.lognormal(mu, SIGMA, SAMPLES)), 8, SEQ_LEN + 1).astype(int)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    with open(path, "w", encoding="utf-8") as f:
        for n in lengths:
            text = letters[rng.integers(0, len(letters), n - 2)].tobytes().decode()
            cut = max(1, min(n - 3, round(PROMPT_SHARE * (n - 2))))
            f.write(json.dumps({"prompt": text[:cut], "response": text[cut:]}) + "\n")
    return {
        "samples": SAMPLES,
        "mean_tokens": float(lengths.mean()),
        "median_tokens": float(np.median(lengths)),
        "p90_tokens": float(np.percentile(lengths, 90)),
        "max_tokens": int(lengths.max()),
        "seq_len": SEQ_LEN,
        "prompt_share": PROMPT_SHARE,
    }


def _args(data: str, packing: bool, steps: int) -> list[str]:
    return [
        *MODEL,
        "--data.format=sft",
        f"--data.path={data}",
        f"--data.seq_len={SEQ_LEN}",
        f"--data.local_batch_size={BATCH}",
        f"--data.packing={str(packing).lower()}",
        f"--training.steps={steps}",
        "--eval.interval=0",
        "--eval.steps=1",
        f"--metrics.log_freq={FIRST}",
        "--metrics.progress=false",
        "--lr_scheduler.warmup_steps=2",
    ]


def labelled_tokens(args: list[str], steps: int) -> tuple[int, int]:
    """(labelled tokens, input positions) of steps FIRST + 1 .. steps of a run with these arguments."""
    from leantrain.config import load_config, parse_overrides
    from leantrain.data import build_datasets, build_tokenizer
    from leantrain.precision import IGNORE_INDEX

    cfg = load_config(None, parse_overrides(args), warn=False)
    train, _ = build_datasets(cfg.data, build_tokenizer("byte"), cfg.job.seed)
    labelled = positions = 0
    for step in range(1, steps + 1):
        batch = train.next_batch()
        if step > FIRST:
            labelled += int((batch[1] != IGNORE_INDEX).sum())
            positions += batch[0].numel()
    return labelled, positions


def run(data: str, packing: bool, steps: int, folder: str) -> dict:
    args = _args(data, packing, steps)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "leantrain", "train", *args, f"--job.dump_folder={folder}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"run failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        records = {r["step"]: r for r in map(json.loads, f)}
    seconds = records[steps]["elapsed_s"] - records[FIRST]["elapsed_s"]
    labelled, positions = labelled_tokens(args, steps)
    return {
        "packing": packing,
        "steps_timed": steps - FIRST,
        "seconds": seconds,
        "labelled_tokens": labelled,
        "labelled_tokens_per_sec": labelled / seconds,
        "input_positions_per_sec": positions / seconds,
        "labelled_fraction": labelled / positions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "packing.json"))
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "sft.jsonl")
        lengths = write_samples(data)
        print(f"data: {json.dumps(lengths)}", flush=True)
        runs, ratios = [], []
        for r in range(opts.repeats):
            pair = {}
            for packing in (True, False):
                pair[packing] = run(data, packing, opts.steps, os.path.join(tmp, f"{r}-{packing}"))
                print(json.dumps(pair[packing]), flush=True)
            runs += [pair[True], pair[False]]
            ratios.append(pair[True]["labelled_tokens_per_sec"] / pair[False]["labelled_tokens_per_sec"])
    result = {
        "command": "python benchmarks/packing.py " + " ".join(sys.argv[1:]),
        "data": lengths,
        "model": MODEL,
        "batch": BATCH,
        "runs": runs,
        "ratios": ratios,
        "median_ratio_packed_over_padded": statistics.median(ratios),
    }
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(
        f"labelled tokens/s, packed / padded: {', '.join(f'{x:.2f}' for x in ratios)} "
        f"(median {result['median_ratio_packed_over_padded']:.2f}); written to {opts.out}"
    )


if __name__ == "__main__":
    main()
