"""Corpora of any size: `leantrain prepare` against the tokenizer's own limit, and training on prepared data.

    python benchmarks/data_scale.py --gb 1 --out benchmarks/results/data_scale.json

Builds jsonl corpora of Python's standard-library source text (one file per document, copies numbered so
no two documents are equal) of 10 MB, 100 MB and --gb GB, and a byte-level BPE tokenizer (16,384 tokens,
trained here on the 10 MB corpus). Then, each in a fresh process:

* limit: the `tokenizers` library's own batch encoding (`encode_batch_fast`, 1,024 documents a call) of the
  large corpus' texts, already in memory, with as many threads as prepare has workers: MB of jsonl per s.
* prepare: `leantrain prepare --workers N` of the 100 MB and the large corpus: MB/s (source bytes over the
  prepare's wall time, start-up included) and peak RSS of its main process and of one worker.
* train: `leantrain train` (`small`, seq 256, batch 8, --steps steps) on the 10 MB corpus raw (tokenized in
  memory) and prepared, and on the large corpus prepared: time from launch to the first logged step, peak
  RSS (wait4), and the median tokens/s of its steps.

Run it alone on the machine: it times things.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 16384


def build_corpus(path: Path, size: int) -> Path:
    """A jsonl of stdlib .py files, cycled (each copy numbered) until it holds ``size`` bytes."""
    if path.exists() and path.stat().st_size >= size:
        return path
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    texts = []
    for f in sources:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size:
            for text in texts:
                line = json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                if written >= size:
                    break
            copy += 1
    return path


def build_tokenizer(corpus: Path, path: Path) -> Path:
    if path.exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts(),
        trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(path))
    return path


LIMIT = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f]
start = time.perf_counter()
tokens = 0
for i in range(0, len(texts), 1024):
    tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i + 1024], add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}))
"""


def _env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAYON_NUM_THREADS": str(threads),
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    }


def _run(cmd: list[str], env: dict[str, str], first_line: Path | None = None) -> dict:
    """Run ``cmd``; its wall time, peak RSS (wait4) and, when ``first_line`` is given, the time until that file
    has its first line (the first logged training step)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while first_line is not None and first is None and proc.poll() is None:
        if first_line.exists() and first_line.read_text().count("\n") >= 1:
            first = time.perf_counter() - start
        time.sleep(0.02)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{err[-4000:]}")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "first_step_s": first, "stdout": out}


def measure_limit(tokenizer: Path, corpus: Path, threads: int) -> dict:
    r = _run([sys.executable, "-c", LIMIT, str(tokenizer), str(corpus)], _env(threads))
    result = json.loads(r["stdout"].strip().splitlines()[-1])
    return {"mb_per_s": corpus.stat().st_size / 1e6 / result["seconds"], **result}


def measure_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    r = _run(
        [
            sys.executable,
            "-m",
            "leantrain",
            "prepare",
            f"--data.path={corpus}",
            f"--tokenizer.path={tokenizer}",
            f"--out={out}",
            f"--workers={workers}",
        ],
        _env(1),
    )
    run = json.loads((out / "manifest.json").read_text())["run"]
    return {
        "mb_per_s_wall": corpus.stat().st_size / 1e6 / r["wall_s"],
        "mb_per_s_loop": run["mb_per_s"],
        "wall_s": r["wall_s"],
        "peak_rss_main": run["peak_rss_main"],
        "peak_rss_worker": run["peak_rss_worker"],
        "tokens": json.loads((out / "manifest.json").read_text())["tokens"],
    }


def measure_train(data: Path, tokenizer: Path, folder: Path, steps: int) -> dict:
    r = _run(
        [
            sys.executable,
            "-m",
            "leantrain",
            "train",
            f"--data.path={data}",
            f"--tokenizer.path={tokenizer}",
            "--model.flavor=small",
            "--data.seq_len=256",
            "--data.local_batch_size=8",
            f"--training.steps={steps}",
            "--metrics.log_freq=1",
            "--eval.interval=0",
            "--eval.steps=1",
            "--metrics.progress=false",
            f"--job.dump_folder={folder}",
        ],
        _env(os.cpu_count() or 1),
        first_line=folder / "metrics.jsonl",
    )
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "first_step_s": r["first_step_s"],
        "peak_rss_bytes": r["peak_rss_bytes"],
        "tokens_per_sec": summary["tokens_per_sec"],
        "wall_s": r["wall_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "leantrain-data-scale"))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = {"10MB": 10 * 10**6, "100MB": 100 * 10**6, "large": int(args.gb * 10**9)}
    corpora = {name: build_corpus(work / f"corpus-{name}.jsonl", size) for name, size in sizes.items()}
    tokenizer = build_tokenizer(corpora["10MB"], work / "tokenizer.json")
    result: dict = {
        "gb": args.gb,
        "workers": args.workers,
        "vocab": VOCAB,
        "steps": args.steps,
        "corpus_bytes": {k: v.stat().st_size for k, v in corpora.items()},
    }
    result["limit"] = measure_limit(tokenizer, corpora["large"], args.workers)
    print("limit", result["limit"], flush=True)
    result["prepare"] = {}
    for name in ("100MB", "large", "10MB"):
        out = work / f"prepared-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        result["prepare"][name] = measure_prepare(corpora[name], tokenizer, out, args.workers)
        print("prepare", name, result["prepare"][name], flush=True)
    result["prepare_vs_limit"] = result["prepare"]["large"]["mb_per_s_wall"] / result["limit"]["mb_per_s"]
    result["train"] = {}
    for name, data in (
        ("raw-10MB", corpora["10MB"]),
        ("prepared-10MB", work / "prepared-10MB"),
        ("prepared-large", work / "prepared-large"),
    ):
        folder = work / f"run-{name}"
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        result["train"][name] = measure_train(data, tokenizer, folder, args.steps)
        print("train", name, result["train"][name], flush=True)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
