"""``leantrain compare``: the same training run under several precision recipes, side by side.

Every recipe starts from the same initial weights (drawn in fp32 from job.seed, rounded to each
storage dtype: precision.init_normal_) and sees the same batches (the data order depends only on
job.seed). Each recipe runs in its own process, so its peak memory is its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from typing import Any

from .config import RECIPES, load_config, parse_overrides
from .errors import ConfigError, DataError
from .files import read_json
from .loader import check_model_and_tokenizer
from .metrics import plot_losses, read_metrics, write_json


def _gap(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else 100.0 * (value - base) / base


def report_table(summaries: list[dict[str, Any]]) -> str:
    """The markdown table of report.md: gaps are to the first recipe's eval loss."""
    base = summaries[0].get("final_eval_loss")
    lines = [
        f"| recipe | final train loss | eval loss | eval gap to {summaries[0]['recipe']} | bytes/param | "
        "tokens/s | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        gap = _gap(s.get("final_eval_loss"), base)
        lines.append(
            f"| {s['recipe']} | {s['final_loss']:.4f} | {s['final_eval_loss']:.4f} | "
            f"{'' if gap is None else f'{gap:+.2f}%'} | {s['state_bytes_per_param']:.2f} | "
            f"{s['tokens_per_sec']:.0f} | {s['peak_memory_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def compare(recipes: list[str], out: str, train_args: list[str], config_path: str | None = None) -> list[dict]:
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise ConfigError(
            f"--recipes has {', '.join(unknown) or 'no recipe'}; allowed: {', '.join(RECIPES)} "
            f"(comma-separated, the first is the baseline of the gaps)."
        )
    repeated = sorted({r for r in recipes if recipes.count(r) > 1})
    if repeated:
        raise ConfigError(
            f"--recipes names {', '.join(repeated)} more than once; each recipe trains once, into its "
            f"own folder under --out. List each recipe once."
        )
    if any(a.startswith("--recipe") for a in train_args):
        raise ConfigError("compare runs the recipes of --recipes; leave --recipe out of its train options.")
    # Validate every recipe's config before any run starts (a contradiction should not surface at run 3).
    overrides = parse_overrides(train_args)
    for r in recipes:
        cfg = load_config(config_path, {**overrides, "recipe": r, "job.dump_folder": os.path.join(out, r)})
        check_model_and_tokenizer(cfg)
        earlier = os.path.join(out, r, "metrics.jsonl")
        if not cfg.checkpoint.enable and os.path.exists(earlier):  # without checkpoints a run appends to it
            raise ConfigError(
                f"--out {out} already holds a run of recipe {r} ({earlier}); a new comparison there "
                f"would mix its curves with that run's. Choose another --out or remove {out} (or "
                f"pass --checkpoint.enable=true, which resumes runs from their checkpoints)."
            )
    os.makedirs(out, exist_ok=True)
    steps = load_config(config_path, {**overrides, "recipe": recipes[0]}).training.steps

    summaries, curves = [], {}
    for r in recipes:
        folder = os.path.join(out, r)
        cmd = [
            sys.executable,
            "-m",
            "leantrain",
            "train",
            f"--recipe={r}",
            f"--job.dump_folder={folder}",
            *(["--config", config_path] if config_path else []),
            *train_args,
        ]
        finished = _finished(folder, steps)  # (without checkpoints such an --out was refused above)
        print(
            f"leantrain compare: recipe {r} ({recipes.index(r) + 1}/{len(recipes)})"
            f"{': finished in an earlier comparison, its results are used' if finished else ''}",
            flush=True,
        )
        proc = subprocess.run(cmd) if not finished else None
        if proc is not None and proc.returncode != 0:
            raise SystemExit(proc.returncode)
        summaries.append(read_json(os.path.join(folder, "summary.json"), DataError))
        curves[r] = read_metrics(os.path.join(folder, "metrics.jsonl"))

    write_json(os.path.join(out, "summary.json"), summaries)
    table = report_table(summaries)
    cfg = load_config(config_path, {**overrides, "recipe": recipes[0], "job.dump_folder": out})
    command = "leantrain compare --recipes " + ",".join(recipes) + f" --out {out} " + " ".join(train_args)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(
            f"# leantrain compare: llama3 {cfg.model.flavor}, {cfg.training.steps} steps, "
            f"peak lr {cfg.optimizer.lr}, seed {cfg.job.seed}\n\n"
        )
        f.write(f"Command: `{command.strip()}`\n\n{table}\n\n![loss curves](loss.png)\n")
    plot_losses(
        curves, os.path.join(out, "loss.png"), title=f"llama3 {cfg.model.flavor}: same init and batches, per recipe"
    )
    print(table, flush=True)
    print(f"leantrain compare: report in {os.path.join(out, 'report.md')}", flush=True)
    return summaries


def _finished(folder: str, steps: int) -> bool:
    """The run in ``folder`` finished at ``steps`` (a rerun would be refused: a finished run is not rewritten)."""
    try:
        return read_json(os.path.join(folder, "summary.json"), DataError).get("steps") == steps
    except DataError:
        return False


def default_out() -> str:
    return f"runs/compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
