"""Training throughput of leantrain vs a hand-written PyTorch loop vs Lightning Fabric, same model and data.

    python benchmarks/throughput.py --repeats 5 --steps 20 --recipes fp32,bf16-mixed,bf16,bf16-sr \
        --out benchmarks/results/throughput.json

For each precision (fp32, bf16-mixed, bf16; and leantrain's default bf16-sr, whose hand and fabric
counterparts are their plain bf16 runs) three implementations train the `small` Llama (seq 256,
batch 8) on the same random token batches:
    leantrain   `leantrain.train.train` itself (data pipeline, logging, leantrain's AdamW);
    hand        a minimal loop: the same model, torch.optim.AdamW(foreach=True), loss on fp32 logits,
                autocast for bf16-mixed: the floor of overhead;
    fabric      Lightning Fabric with precision "32-true", "bf16-mixed" or "bf16-true" and torch AdamW;
    plain       benchmarks/plain_llama.py: a Llama and loop written as a new user would, all in the parameters'
                dtype with no fp32 islands (bf16 RMSNorm statistics, RoPE and logits; torch AdamW), eager;
    plain-compiled  the same with torch.compile(model).
leantrain runs with compile.enable as --compile says (default auto: its default settings, compiled on a CPU
with a C++ compiler). plain and plain-compiled have fp32 and bf16 rows only.
Each (implementation, precision) runs in a fresh process; repeats are interleaved (every combination
once per repeat) so a noisy neighbour slows all alike. Reported: the median over repeats of each run's
median step time after 3 warm-up steps, as tokens/s, and ratios taken within a repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, BATCH, WARMUP = 256, 8, 3
FABRIC_PRECISION = {"fp32": "32-true", "bf16-mixed": "bf16-mixed", "bf16": "bf16-true"}
# leantrain-only recipes (compensated full bf16): hand and fabric have no equivalent, so their rows are
# compared with the plain full-bf16 runs of hand and fabric (torch AdamW on bf16 parameters).
PEER = {"bf16-sr": "bf16", "bf16-kahan": "bf16", "bf16-int8": "bf16"}


def _batches(steps: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def run_hand(recipe: str, steps: int) -> list[float]:
    import torch
    import torch.nn.functional as F

    import leantrain

    dtype = torch.bfloat16 if recipe == "bf16" else torch.float32
    model = leantrain.build_model("small", dtype=dtype, max_seq_len=SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    times = []
    for batch in _batches(steps, model.args.vocab_size):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe == "bf16-mixed"):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def run_fabric(recipe: str, steps: int) -> list[float]:
    import lightning as L
    import torch
    import torch.nn.functional as F

    import leantrain

    fabric = L.Fabric(accelerator="cpu", devices=1, precision=FABRIC_PRECISION[recipe])
    with fabric.init_module():
        model = leantrain.build_model("small", dtype=torch.float32, max_seq_len=SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    model, opt = fabric.setup(model, opt)
    times = []
    for batch in _batches(steps, 259):
        t = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        fabric.backward(loss)
        fabric.clip_gradients(model, opt, max_norm=1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def run_leantrain(recipe: str, steps: int, compile: str = "auto") -> list[float]:
    from leantrain.config import load_config
    from leantrain.metrics import read_metrics
    from leantrain.runplan import resolve
    from leantrain.train import train

    folder = tempfile.mkdtemp()
    cfg = load_config(
        None,
        {
            "recipe": recipe,
            "model.flavor": "small",
            "data.seq_len": str(SEQ),
            "data.local_batch_size": str(BATCH),
            "training.steps": str(steps),
            "metrics.log_freq": "5",
            "eval.interval": "0",
            "eval.steps": "1",
            "metrics.progress": "false",
            "lr_scheduler.warmup_steps": "0",
            "job.dump_folder": folder,
            "compile.enable": compile,
        },
    )
    train(resolve(cfg))
    # tokens_per_sec of a record covers the steps since the previous one (logging and the lost-update meter
    # included, as in a real run; the final eval runs after the last interval is timed). The first record
    # (step 1) is warm-up; each later one stands for its interval's 5 steps.
    records = read_metrics(os.path.join(folder, "metrics.jsonl"))[1:]
    return [0.0] * WARMUP + [SEQ * BATCH / r["tokens_per_sec"] for r in records for _ in range(5)]


def run_plain(recipe: str, steps: int, compile: bool) -> list[float]:
    import torch

    from plain_llama import run_plain as plain

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[recipe]
    return plain("small", dtype, _batches(steps, 259), compile)


def worker(impl: str, recipe: str, steps: int, compile: str) -> None:
    if impl == "leantrain":
        times = run_leantrain(recipe, steps, compile)
    elif impl.startswith("plain"):
        times = run_plain(recipe, steps, compile=impl == "plain-compiled")
    else:
        times = {"hand": run_hand, "fabric": run_fabric}[impl](recipe, steps)
    step = statistics.median(times[WARMUP:])
    print(
        json.dumps(
            {
                "impl": impl,
                "recipe": recipe,
                "step_s": step,
                "tokens_per_sec": SEQ * BATCH / step,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--recipes", default="fp32,bf16-mixed,bf16")
    ap.add_argument("--impls", default="hand,leantrain,fabric")
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--compile",
        choices=("auto", "true", "false"),
        default="auto",
        help="leantrain's compile.enable (default auto, leantrain's default: compiled where a compiler works)",
    )
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "RECIPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
        worker(*args.worker, args.steps, args.compile)
        return
    # each implementation's run of each recipe (the peers run a leantrain-only recipe's PEER), once
    combos = [
        (i, r if i == "leantrain" else PEER.get(r, r)) for r in args.recipes.split(",") for i in args.impls.split(",")
    ]
    combos = list(dict.fromkeys(c for c in combos if not c[0].startswith("plain") or c[1] in ("fp32", "bf16")))
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in combos}
    for rep in range(args.repeats):
        for impl, recipe in combos:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", impl, recipe, "--steps", str(args.steps)]
                + ["--compile", args.compile],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            runs[(impl, recipe)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"repeat {rep}: {impl:9s} {recipe:10s} {runs[(impl, recipe)][-1]['tokens_per_sec']:.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )

    def key(impl, recipe):
        return (impl, recipe if impl == "leantrain" else PEER.get(recipe, recipe))

    def med(impl, recipe, k="tokens_per_sec"):
        return statistics.median(r[k] for r in runs[key(impl, recipe)])

    def ratio(a, b):  # within-repeat ratios, then the median
        return statistics.median(
            x["tokens_per_sec"] / y["tokens_per_sec"] for x, y in zip(runs[key(*a)], runs[key(*b)])
        )

    recipes, impls = args.recipes.split(","), args.impls.split(",")
    peers = [i for i in ("hand", "fabric", "plain", "plain-compiled") if i in impls and "leantrain" in impls]
    lines = [
        "| precision | "
        + " | ".join(f"{i} tok/s" for i in impls)
        + " | "
        + "".join(f"leantrain / {i} | " for i in peers)
        + "peak RSS MiB ("
        + ", ".join(impls)
        + ") |",
        "|---" * (len(impls) + len(peers) + 2) + "|",
    ]
    for r in recipes:
        name = f"{r} (peers: {PEER[r]})" if r in PEER and peers else r
        lines.append(
            f"| {name} | "
            + " | ".join(f"{med(i, r):.0f}" if key(i, r) in runs else "-" for i in impls)
            + " | "
            + "".join(f"{ratio(('leantrain', r), (i, r)):.3f} | " if key(i, r) in runs else "- | " for i in peers)
            + ", ".join(f"{med(i, r, 'peak_rss_bytes') / 2**20:.0f}" if key(i, r) in runs else "-" for i in impls)
            + " |"
        )
    if "bf16-sr" in recipes and "bf16" in recipes:
        lines.append("")
        lines.append(
            f"leantrain bf16-sr / leantrain bf16: {ratio(('leantrain', 'bf16-sr'), ('leantrain', 'bf16')):.3f}x"
            + f" (compile.enable={args.compile})"
        )
    if "fp32" in recipes and "bf16" in recipes and "fabric" in peers:
        lines.append("")
        lines.append(
            f"leantrain bf16 / leantrain fp32: {ratio(('leantrain', 'bf16'), ('leantrain', 'fp32')):.2f}x; "
            f"leantrain bf16 / fabric bf16-true: {ratio(('leantrain', 'bf16'), ('fabric', 'bf16')):.2f}x"
        )
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {"args": vars(args), "table": lines, "runs": {f"{i}/{r}": v for (i, r), v in runs.items()}}, f, indent=1
            )


if __name__ == "__main__":
    main()
