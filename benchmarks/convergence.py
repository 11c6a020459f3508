"""Does full bf16 train like fp32? Recipe x seed x regime, paired gaps to fp32 on the built-in corpus.

    python benchmarks/convergence.py --out benchmarks/results/convergence          # the full matrix
    python benchmarks/convergence.py --seeds 0 --regimes low --steps-scale 0.1    # a quick look

Every run of one (seed, regime) pair starts from the same initial weights (drawn in fp32 from the
seed, rounded to bf16 for bf16 storage) and sees the same batches as the fp32 run: the gap
``100 * (eval_loss(recipe) - eval_loss(fp32)) / eval_loss(fp32)`` is *paired*. Each recipe's final
weights are evaluated twice on the whole held-out split: in the recipe's own precision, and upcast to
fp32 with an fp32 forward (training quality without inference rounding).

Regimes (tiny Llama: dim 128, 4 layers, byte vocab, seq 128, batch 8; AdamW betas (0.9, 0.999),
wd 0.01; warmup 50 then cosine to 10% of the peak):
    low        peak lr 1e-4, 600 steps  (the warmup of any large run)
    pretrain   peak lr 1e-3, 1000 steps
    finetune   SFT from pretrained weights: per seed, the benchmark first pretrains the model in fp32 on the
               built-in corpus (peak lr 1e-3, 600 steps) and exports it (a Hugging Face folder); every recipe
               then fine-tunes those weights (model.hf_checkpoint, rounded to bf16 for bf16 storage) on
               synthetic instruction pairs (data.format=sft, packed; word tasks made from the corpus' words:
               reverse, upper-case, spell out, next word) at peak lr 2e-5 for 300 steps, and is evaluated on
               the held-out pairs' response tokens. The seed's use case: plain bf16 loses most updates there.

Besides leantrain's recipes, two anchors show what each part buys: ``sr-weights`` (stochastic
rounding of the weights only, nearest-rounded bf16 moments: torchao's bf16_stochastic_round) and
``kahan-nearest`` (Kahan weights, nearest-rounded bf16 moments: optimi's Kahan). ``fp32-perturbed``
(fp32 with the peak lr times 1 + 1e-6) measures the noise floor of a paired gap in each regime.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REGIMES = {
    "low": {"optimizer.lr": "1e-4", "training.steps": 600},
    "pretrain": {"optimizer.lr": "1e-3", "training.steps": 1000},
    "finetune": {"optimizer.lr": "2e-5", "training.steps": 300},
}
BASE = {"optimizer.lr": "1e-3", "training.steps": "600"}  # the finetune regime's fp32 pretraining
RUNS = {  # name -> config overrides (recipes by name, anchors as explicit keys)
    "fp32": {"recipe": "fp32"},
    "bf16": {"recipe": "bf16"},
    "bf16-sr": {"recipe": "bf16-sr"},
    "bf16-kahan": {"recipe": "bf16-kahan"},
    "bf16-int8": {"recipe": "bf16-int8"},
    "bf16-int4": {"recipe": "bf16-int4"},
    "bf16-int4-int8": {"recipe": "bf16-int4-int8"},
    "sr-weights (torchao)": {
        "training.dtype": "bfloat16",
        "optimizer.compensation": "stochastic",
        "optimizer.moments_rounding": "nearest",
    },
    "kahan-nearest (optimi)": {
        "training.dtype": "bfloat16",
        "optimizer.compensation": "kahan",
        "optimizer.moments_rounding": "nearest",
    },
    # The noise floor of a paired comparison: fp32 again, with every update scaled by 1 + 1e-6 (through the
    # peak lr), a perturbation 16x fp32's own rounding and thousands of times smaller than bf16's. Whatever
    # gap this run shows is how far two fp32 trajectories drift apart from a tiny difference, not precision.
    "fp32-perturbed (lr x 1.000001)": {"recipe": "fp32", "lr_factor": 1.000001},
    # FactoredAdamW (optim/rules.py). Gradient release cannot clip (optim/release.py), so its pair is fp32 unclipped
    "bf16-int8-factored": {"recipe": "bf16-int8-factored"},
    "fp32-noclip": {"recipe": "fp32", "training.max_norm": "0"},
    "bf16-int8-factored+release": {
        "recipe": "bf16-int8-factored",
        "optimizer.in_backward": "true",
        "training.max_norm": "0",
    },
    # Clipping under gradient release (training.release_clipping), paired with exact clipping at max_norm 1.0 (the
    # recipe's normal step), and each again with a loss spike: at step SPIKE_AT the batch is random tokens
    **{
        f"bf16-int8-factored+release-{rule}{spike}": {
            "recipe": "bf16-int8-factored",
            "optimizer.in_backward": "true",
            "training.release_clipping": rule,
            **({"spike": True} if spike else {}),
        }
        for rule in ("per_tensor", "previous_norm")
        for spike in ("", "-spike")
    },
    "bf16-int8-factored-spike": {"recipe": "bf16-int8-factored", "spike": True},
    # Adafactor (no m): its update clipping (RMS 1) against none, with exact clipping and with release's
    "bf16-factored-no-m": {"recipe": "bf16-factored-no-m"},
    "bf16-factored-no-m-noupdateclip": {"recipe": "bf16-factored-no-m", "update_clip": 0.0},
    "bf16-factored-no-m+release": {"recipe": "bf16-factored-no-m", "optimizer.in_backward": "true"},
    **{
        f"bf16-factored-no-m-lr-x{factor:g}": {"recipe": "bf16-factored-no-m", "lr_factor": factor}
        for factor in (0.25, 0.5, 2, 4, 8, 16)
    },
    # The lr sweep (best against best: a rule whose effective step differs is compared at each one's best lr)
    **{
        f"{name}-lr-x{factor:g}": {"recipe": name, "lr_factor": factor}
        for name in ("fp32", "bf16-int8-factored")
        for factor in (0.5, 2, 4, 8, 16)
    },
}
# Smaller than the measurement (dim 256, seq 256) to keep the matrix near half an hour on 2 cores (48 runs
# now take about 50 minutes, the noise-floor run included).
MODEL = {
    "model.flavor": "debug",
    "model.dim": "128",
    "model.n_layers": "4",
    "model.n_heads": "4",
    "model.n_kv_heads": "2",
    "model.ffn_dim": "384",
    "data.seq_len": "128",
    "data.local_batch_size": "8",
    "optimizer.betas": "0.9,0.999",
    "optimizer.weight_decay": "0.01",
    "lr_scheduler.warmup_steps": "50",
    "lr_scheduler.decay": "cosine",
    "lr_scheduler.min_lr_factor": "0.1",
    "eval.steps": "1000",
    "metrics.progress": "false",
    "metrics.log_freq": "25",
    # eager blocks: the matrix measures the optimizer's numerics (its compiled update is bitwise the eager
    # one), and a compile per run would cost more than it saves on this tiny model
    "compile.enable": "false",
}


SPIKE_AT = 100  # the step whose batch a "spike" run replaces with random tokens (finetune: 300 steps, warmup 30)
SPIKE_LOSSES = 40  # a spike run records its training loss at every step from SPIKE_AT to SPIKE_AT + this


def _spike_hooks():
    """Hooks that give step SPIKE_AT a batch of uniformly random tokens, every one a label: a loss spike."""
    import torch

    from leantrain.hooks import Hooks

    class Spike(Hooks):
        def batches(self, step, batches):
            if step != SPIKE_AT:
                return batches
            gen = torch.Generator().manual_seed(step)
            out = []
            for inputs, labels, *rest in batches:
                tokens = torch.randint(0, 256, (inputs.shape[0], inputs.shape[1] + 1), generator=gen)
                out.append([tokens[:, :-1].to(inputs), tokens[:, 1:].to(labels), *rest])
            return out

    return Spike()


def sft_pairs(path: str, count: int = 6000) -> str:
    """Synthetic instruction pairs from the built-in corpus' words, as .jsonl (written once)."""
    import random
    import re

    from leantrain.data import load_documents

    if os.path.exists(path):
        return path
    text = " ".join(load_documents("builtin"))
    words = re.findall(r"[a-z]{3,12}", text.lower())
    vocab = sorted(set(words))
    rng = random.Random(0)
    tasks = [
        ("Reverse the word: {w}", lambda w, i: w[::-1]),
        ("Write in capitals: {w}", lambda w, i: w.upper()),
        ("Spell out: {w}", lambda w, i: "-".join(w)),
        ("Which word follows '{w}' in the text?", lambda w, i: words[i + 1]),
    ]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for _ in range(count):
            i = rng.randrange(len(words) - 1)
            prompt, answer = rng.choice(tasks)
            w = words[i] if "follows" in prompt else rng.choice(vocab)
            f.write(json.dumps({"prompt": prompt.format(w=w), "response": answer(w, i)}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def base_model(seed: int, out: str) -> str:
    """The finetune regime's starting point for a seed: pretrained in fp32 here, exported as a Hugging Face folder."""
    import torch

    torch.set_num_threads(1)
    from leantrain.config import load_config
    from leantrain.hf import save_hf
    from leantrain.runplan import resolve
    from leantrain.train import train

    folder = os.path.join(out, "finetune", f"base-seed{seed}")
    if os.path.exists(os.path.join(folder, "hf", "config.json")):
        return os.path.join(folder, "hf")
    shutil.rmtree(folder, ignore_errors=True)
    cfg = load_config(
        None,
        {
            **MODEL,
            **BASE,
            "recipe": "fp32",
            "eval.interval": "0",
            "job.seed": str(seed),
            "job.dump_folder": os.path.join(folder, "run"),
        },
    )
    _, model = train(resolve(cfg))
    save_hf(model, os.path.join(folder, "hf"))
    return os.path.join(folder, "hf")


def _finetune_overrides(seed: int, out: str) -> dict:
    """The finetune regime's keys: the model from its pretrained folder, SFT data."""
    keys = {k: v for k, v in MODEL.items() if not k.startswith("model.")}
    return {
        **keys,
        "model.hf_checkpoint": os.path.join(out, "finetune", f"base-seed{seed}", "hf"),
        "tokenizer.path": "byte",
        "data.format": "sft",
        "data.path": os.path.join(out, "finetune", "sft.jsonl"),
        "lr_scheduler.warmup_steps": "30",
    }


def one_run(name: str, seed: int, regime: str, steps_scale: float, out: str) -> dict:
    import torch

    torch.set_num_threads(1)  # the workers share the cores; one thread each is fastest for a tiny model
    run = dict(RUNS[name])
    lr = float(REGIMES[regime]["optimizer.lr"]) * run.pop("lr_factor", 1.0)
    spike = run.pop("spike", False)
    update_clip = run.pop("update_clip", None)
    if update_clip is None:
        return _one_run_with(name, seed, regime, steps_scale, out, run, lr, spike)
    import dataclasses

    from leantrain.optim import optimizer as optim_module

    rule = optim_module.Adafactor.rule  # Adafactor's update clipping threshold, set in this worker for this run
    optim_module.Adafactor.rule = dataclasses.replace(rule, update_clip=update_clip)
    try:
        return _one_run_with(name, seed, regime, steps_scale, out, run, lr, spike)
    finally:
        optim_module.Adafactor.rule = rule


def _one_run_with(
    name: str, seed: int, regime: str, steps_scale: float, out: str, run: dict, lr: float, spike: bool
) -> dict:
    import torch

    from leantrain.config import load_config
    from leantrain.data import PackedDataset, build_tokenizer, load_documents, split_documents
    from leantrain.evaluation import evaluate
    from leantrain.runplan import precision_of, resolve
    from leantrain.train import train

    steps = max(60, int(REGIMES[regime]["training.steps"] * steps_scale))
    if spike:
        run["metrics.log_freq"] = "1"  # the loss of every step around the spike
    model_keys = _finetune_overrides(seed, out) if regime == "finetune" else MODEL
    overrides = {
        **model_keys,
        **run,
        "optimizer.lr": repr(lr),
        "training.steps": str(steps),
        "eval.interval": str(max(1, steps // 6)),
        "job.seed": str(seed),
        "job.dump_folder": os.path.join(out, regime, f"seed{seed}", name.split()[0]),
    }
    cfg = load_config(None, overrides)
    # A fresh folder: without checkpoints leantrain appends to an existing metrics.jsonl, which would mix an
    # earlier run's curve into this one's.
    shutil.rmtree(cfg.job.dump_folder, ignore_errors=True)
    start = time.perf_counter()
    plan = resolve(cfg)
    summary, model = train(plan, _spike_hooks()) if spike else train(plan)
    # The same weights, upcast, through an fp32 forward: what was learned, without inference rounding.
    fp32_cfg = load_config(
        None,
        {
            **{k: v for k, v in overrides.items() if not k.startswith(("recipe", "optimizer.", "training."))},
            "recipe": "fp32",
        },
    )
    tok = build_tokenizer(plan.config.tokenizer.path)  # tokenizer.path=auto decided
    if regime == "finetune":  # the held-out pairs, as the trainer's evaluation reads them
        from leantrain.data import build_datasets

        eval_data = build_datasets(plan.config.data, tok, seed, tokenizer_path=plan.config.tokenizer.path)[1]
    else:
        _, eval_docs = split_documents(load_documents(cfg.data.path))
        eval_data = PackedDataset(eval_docs, tok, cfg.data.seq_len, cfg.data.local_batch_size, seed, shuffle=False)
    fp32_eval = evaluate(
        copy.deepcopy(model).float(),
        eval_data.eval_batches(fp32_cfg.eval.steps),
        precision_of(fp32_cfg),
        torch.device("cpu"),
    ).loss
    from leantrain.metrics import read_metrics

    records = read_metrics(os.path.join(cfg.job.dump_folder, "metrics.jsonl"))
    lost = [
        r.get("lost_update_fraction", r.get("unchanged_update_fraction"))
        for r in records
        if "lost_update_fraction" in r or "unchanged_update_fraction" in r
    ]
    return {
        "name": name,
        "seed": seed,
        "regime": regime,
        "steps": steps,
        "eval_loss": summary["final_eval_loss"],
        "eval_loss_fp32_forward": fp32_eval,
        "final_loss": summary["final_loss"],
        "state_bytes_per_param": summary["state_bytes_per_param"],
        "mean_lost_update_fraction": statistics.mean(lost) if lost else None,
        "curve": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
        **(
            {
                "spike_losses": [
                    (r["step"], r["loss"])
                    for r in records
                    if SPIKE_AT <= r["step"] <= SPIKE_AT + SPIKE_LOSSES and "loss" in r
                ]
            }
            if spike
            else {}
        ),
        "seconds": time.perf_counter() - start,
    }


def gaps(results: list[dict], key: str, baseline: str = "fp32") -> dict[tuple[str, str], list[float]]:
    base = {(r["regime"], r["seed"]): r[key] for r in results if r["name"] == baseline}
    out: dict[tuple[str, str], list[float]] = {}
    for r in results:
        b = base.get((r["regime"], r["seed"]))
        if b is not None:
            out.setdefault((r["name"], r["regime"]), []).append(100 * (r[key] - b) / b)
    return out


def table(results: list[dict], regimes: list[str]) -> str:
    own, f32 = gaps(results, "eval_loss"), gaps(results, "eval_loss_fp32_forward")
    head = "| recipe | bytes/param | " + " | ".join(
        f"{g}: gap, own precision (mean [min, max]) | {g}: gap, fp32 forward | {g}: unchanged weights" for g in regimes
    )
    lines = [head + " |", "|---" * (2 + 3 * len(regimes)) + "|"]
    for name in RUNS:
        rows = [r for r in results if r["name"] == name]
        if not rows:
            continue
        cells = [name, f"{rows[0]['state_bytes_per_param']:.2f}"]
        for g in regimes:
            o, f = own.get((name, g), []), f32.get((name, g), [])
            lost = [
                r["mean_lost_update_fraction"]
                for r in rows
                if r["regime"] == g and r["mean_lost_update_fraction"] is not None
            ]
            cells.append(f"{statistics.mean(o):+.2f}% [{min(o):+.2f}, {max(o):+.2f}]" if o else "")
            cells.append(f"{statistics.mean(f):+.2f}%" if f else "")
            cells.append(f"{statistics.mean(lost):.1%}" if lost else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Unchanged weights: mean over logged steps of lost_update_fraction, the share of bf16 weight elements "
        "whose nonzero update left the stored value unchanged (lost for good under nearest rounding; "
        "under stochastic rounding or Kahan, carried in expectation or in the buffer)."
    )
    fp32 = {g: [r["eval_loss"] for r in results if r["name"] == "fp32" and r["regime"] == g] for g in regimes}
    lines.append("")
    lines.append(
        "fp32 eval loss per seed: " + "; ".join(f"{g}: " + ", ".join(f"{v:.4f}" for v in fp32[g]) for g in regimes)
    )
    return "\n".join(lines)


def plot(results: list[dict], regimes: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(regimes), figsize=(7 * len(regimes), 5), dpi=110, squeeze=False)
    present = [name for name in RUNS if any(r["name"] == name for r in results)]  # one colour each (up to 20)
    colours = plt.get_cmap("tab20" if len(present) > 10 else "tab10")
    for ax, g in zip(axes[0], regimes):
        for i, name in enumerate(present):
            rows = [r for r in results if r["name"] == name and r["regime"] == g]
            if not rows:
                continue
            steps = [s for s, _ in rows[0]["curve"]]
            mean = [statistics.mean(r["curve"][k][1] for r in rows) for k in range(len(steps))]
            ax.plot(steps, mean, marker="o", ms=3, color=colours(i), label=name)
        ax.set_title(f"{g}: held-out loss, mean over seeds")
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pooled(dirs: list[str], regimes: list[str], baseline: str = "fp32") -> str:
    """Paired gaps (own precision) to `baseline`'s run of the same seed over every seed in the runs.jsonl of several
    --out folders."""
    unique = {}  # a run repeated in several folders (same name, seed, regime and steps: the same result) counts once
    for d in dirs:
        with open(os.path.join(d, "runs.jsonl")) as f:
            for r in (json.loads(line) for line in f if line.strip()):
                unique.setdefault((r["name"], r["seed"], r["regime"], r["steps"]), r)
    results = list(unique.values())
    own = gaps(results, "eval_loss", baseline)
    lines = [
        f"| run | regime | seeds | mean gap to {baseline} | sd | standard error | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in RUNS:
        for g in regimes:
            o = own.get((name, g))
            if o and name != baseline:
                sd = statistics.stdev(o) if len(o) > 1 else 0.0
                lines.append(
                    f"| {name} | {g} | {len(o)} | {statistics.mean(o):+.2f}% | {sd:.2f}% | "
                    f"{sd / len(o) ** 0.5:.2f}% | " + ", ".join(f"{x:+.2f}" for x in o) + " |"
                )
    spikes = [r for r in results if "spike_losses" in r]
    if spikes:
        lines += [
            "",
            f"Spike runs (step {SPIKE_AT}'s batch is random tokens): the loss of that batch, the mean training "
            f"loss of the 10 steps after it and of steps {SPIKE_AT + 11}-{SPIKE_AT + SPIKE_LOSSES}, the final eval "
            "loss (means over seeds)",
            "",
            "| run | seeds | spike batch loss | steps +1..+10 | steps +11..+40 | final eval loss |",
            "|---|---|---|---|---|---|",
        ]
        for name in RUNS:
            mine = [r for r in spikes if r["name"] == name]
            if mine:

                def mean_over(lo, hi):
                    return statistics.mean(
                        statistics.mean(v for s, v in r["spike_losses"] if lo <= s - SPIKE_AT <= hi) for r in mine
                    )

                lines.append(
                    f"| {name} | {len(mine)} | {mean_over(0, 0):.3f} | {mean_over(1, 10):.4f} | "
                    f"{mean_over(11, SPIKE_LOSSES):.4f} | {statistics.mean(r['eval_loss'] for r in mine):.4f} |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--regimes", default="low,pretrain")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated names from: " + ", ".join(RUNS))
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply each regime's steps (quick looks)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/convergence")
    ap.add_argument(
        "--pool",
        nargs="+",
        metavar="DIR",
        default=None,
        help="run nothing: print the gaps over all seeds of these --out folders together",
    )
    ap.add_argument("--baseline", default="fp32", help="--pool: the run every gap is paired with")
    args = ap.parse_args()
    if args.pool:
        print(pooled(args.pool, args.regimes.split(","), args.baseline))
        return
    seeds, regimes = [int(s) for s in args.seeds.split(",")], args.regimes.split(",")
    names = [n for n in RUNS if n in args.runs.split(",")]
    os.makedirs(args.out, exist_ok=True)
    # Each finished run is appended to runs.jsonl at once; a rerun with the same --out skips those (resume).
    log_path = os.path.join(args.out, "runs.jsonl")
    done = []
    if os.path.exists(log_path):
        with open(log_path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    finished = {(r["name"], r["seed"], r["regime"], r["steps"]) for r in done}
    jobs = [
        (n, s, g)
        for g in regimes
        for s in seeds
        for n in names
        if (n, s, g, max(60, int(REGIMES[g]["training.steps"] * args.steps_scale))) not in finished
    ]
    wanted = {(n, s, g) for g in regimes for s in seeds for n in names}
    results = [r for r in done if (r["name"], r["seed"], r["regime"]) in wanted]
    with ProcessPoolExecutor(max_workers=args.workers) as pool, open(log_path, "a") as log:
        if any(g == "finetune" for _, _, g in jobs):  # the pretrained starting points first
            sft_pairs(os.path.join(args.out, "finetune", "sft.jsonl"))
            for fut in [
                pool.submit(base_model, s, args.out) for s in sorted({s for _, s, g in jobs if g == "finetune"})
            ]:
                fut.result()
        futures = [pool.submit(one_run, n, s, g, args.steps_scale, args.out) for n, s, g in jobs]
        for fut in futures:
            r = fut.result()
            results.append(r)
            log.write(json.dumps(r) + "\n")
            log.flush()
            print(
                f"{r['regime']:8s} seed {r['seed']} {r['name']:24s} eval {r['eval_loss']:.4f} "
                f"(fp32 forward {r['eval_loss_fp32_forward']:.4f}) {r['seconds']:.0f}s",
                flush=True,
            )
    results.sort(key=lambda r: (regimes.index(r["regime"]), r["seed"], names.index(r["name"])))
    text = table(results, regimes)
    print(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"Command: `python benchmarks/convergence.py {shlex.join(sys.argv[1:])}`\n\n{text}\n")
    plot(results, regimes, os.path.join(args.out, "convergence.png"))


if __name__ == "__main__":
    main()
