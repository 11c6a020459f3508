"""How far do the stored Adam moments of each recipe drift from exact ones, and does the step size change?

    python benchmarks/moment_bias.py --out benchmarks/results/moment_bias.json

Trains the convergence benchmark's tiny Llama (benchmarks/convergence.py: dim 128, 4 blocks, seq 128, batch 8,
built-in corpus, its "low" regime: peak lr 1e-4, 600 steps) with each recipe, and keeps beside the optimizer a
*shadow* copy of both moments: exact fp32 EMAs of the very gradients the optimizer received (a step post-hook).
Every `--every` steps it compares the optimizer's stored moments (dequantized for int8) with the shadow ones,
over the tensors whose moments the recipe stores in low precision (int8, int4: tensors of 4096 elements or more;
FactoredAdamW's matrices: v read from its row and column factors, the estimate the update uses):

    v_ratio        sum(v_stored) / sum(v_exact)                     (the second moment's aggregate bias; int8, int4
                                                                     dequantized)
    v_zero         share of elements with v_exact > 0 stored as v = 0
    m_ratio        sum(|m_stored|) / sum(|m_exact|)
    step_ratio     sum(|u_stored|) / sum(|u_exact|), u = m_hat / (sqrt(v_hat) + eps): the Adam step size
                   the stored moments give, relative to exact moments along the same trajectory

    step_bias      sum(u_stored * sign(u_exact)) / sum(|u_exact|): the stored step's component along the exact one,
                   relative to it. Unbiased noise in m (stochastic codes) raises step_ratio (|u + noise| > |u| on
                   average) but not step_bias, so the two tell noise from bias: step_bias above 1 is a bias
                   (in this benchmark it comes from v, E[1/sqrt(v_stored)] > 1/sqrt(v) where v's codes are coarse)

A step_ratio above 1 means the recipe takes larger steps than fp32 Adam would with the same gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from convergence import MODEL, REGIMES  # noqa: E402


def stored_moments(opt, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The optimizer's moments of `p` in fp32, or None when they are not stored in low precision."""
    from leantrain.optim import quant

    st = opt.state[p]
    if opt.layout(p).factored:  # FactoredAdamW: v is the factors' estimate (the rule's error, not a rounding's)
        m_fmt = quant.STORAGES[opt.layout(p).moments].exp_avg if "exp_avg_codes" in st else None
        m = (
            quant.dequantize(st["exp_avg_codes"].view(-1), st["exp_avg_scale"], True, m_fmt)
            if m_fmt
            else st["exp_avg"].float().view(-1)
        )
        row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
        return m, (torch.outer(row, col) / col.mean()).view(-1)
    if "exp_avg_codes" in st:
        m_fmt, v_fmt = quant.STORAGES[opt.layout(p).moments]
        return (
            quant.dequantize(st["exp_avg_codes"].view(-1), st["exp_avg_scale"], True, m_fmt),
            quant.dequantize(st["exp_avg_sq_codes"].view(-1), st["exp_avg_sq_scale"], False, v_fmt),
        )
    if st["exp_avg"].dtype == torch.float32:
        return None
    return st["exp_avg"].float().view(-1), st["exp_avg_sq"].float().view(-1)


def measure(name: str, seed: int, regime: str, every: int) -> list[dict]:
    torch.set_num_threads(1)
    import leantrain.train as lt
    from leantrain.config import RECIPES, load_config
    from leantrain.runplan import resolve

    rows: list[dict] = []
    build = lt.build_optimizer

    def build_with_shadow(*args, **kwargs):
        opt = build(*args, **kwargs)
        shadow: dict[torch.Tensor, list[torch.Tensor]] = {}
        beta1, beta2 = kwargs["betas"]
        eps = kwargs["eps"]
        count = [0]

        def hook(optimizer, _args, _kwargs):
            count[0] += 1
            step = count[0]
            sums = dict(
                v_stored=0.0,
                v_exact=0.0,
                v_zero=0,
                v_pos=0,
                m_stored=0.0,
                m_exact=0.0,
                u_stored=0.0,
                u_exact=0.0,
                u_along=0.0,
                elements=0,
            )
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad.float().view(-1)
                    m, v = shadow.setdefault(p, [torch.zeros_like(g), torch.zeros_like(g)])
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    if step % every or (stored := stored_moments(optimizer, p)) is None:
                        continue
                    mq, vq = stored
                    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
                    u_exact = (m / bc1) / ((v / bc2).sqrt() + eps)
                    u_stored = (mq / bc1) / ((vq / bc2).sqrt() + eps)
                    sums["v_stored"] += vq.sum().item()
                    sums["v_exact"] += v.sum().item()
                    sums["v_zero"] += ((vq == 0) & (v > 0)).sum().item()
                    sums["v_pos"] += (v > 0).sum().item()
                    sums["m_stored"] += mq.abs().sum().item()
                    sums["m_exact"] += m.abs().sum().item()
                    sums["u_stored"] += u_stored.abs().sum().item()
                    sums["u_exact"] += u_exact.abs().sum().item()
                    sums["u_along"] += (u_stored * u_exact.sign()).sum().item()
                    sums["elements"] += g.numel()
            if sums["elements"]:
                rows.append(
                    dict(
                        recipe=name,
                        seed=seed,
                        step=step,
                        elements=sums["elements"],
                        v_ratio=sums["v_stored"] / sums["v_exact"],
                        v_zero=sums["v_zero"] / max(1, sums["v_pos"]),
                        m_ratio=sums["m_stored"] / sums["m_exact"],
                        step_ratio=sums["u_stored"] / sums["u_exact"],
                        step_bias=sums["u_along"] / sums["u_exact"],
                    )
                )

        opt.register_step_post_hook(hook)
        return opt

    lt.build_optimizer = build_with_shadow
    recipe, _, rounding = name.partition("@")  # bf16-int8@nearest: the recipe's keys, moments_rounding=nearest
    keys = (
        {**{k: str(v) for k, v in RECIPES[recipe].items()}, "optimizer.moments_rounding": rounding}
        if rounding
        else {"recipe": recipe}
    )
    overrides = {
        **MODEL,
        **keys,
        "optimizer.lr": REGIMES[regime]["optimizer.lr"],
        "training.steps": str(REGIMES[regime]["training.steps"]),
        "eval.interval": "0",
        "job.seed": str(seed),
        "job.dump_folder": tempfile.mkdtemp(),
    }
    lt.train(resolve(load_config(None, overrides)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--recipes",
        default="bf16-int8,bf16-int8@nearest,bf16-int4,bf16-int4@nearest,bf16-int4-int8,bf16-sr,bf16",
        help="comma-separated; RECIPE@nearest: that recipe with optimizer.moments_rounding=nearest",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--regime", default="low", choices=list(REGIMES))
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = [r for recipe in args.recipes.split(",") for r in measure(recipe, args.seed, args.regime, args.every)]
    print(f"{args.regime} regime, seed {args.seed}: stored moments vs exact fp32 EMAs of the same gradients\n")
    print("| recipe | step | v_ratio | v stored as 0 | m_ratio | step_ratio | step_bias |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['step']} | {r['v_ratio']:.4f} | {100 * r['v_zero']:.3f}% | "
            f"{r['m_ratio']:.4f} | {r['step_ratio']:.4f} | {r['step_bias']:.4f} |"
        )
    print("\nover the whole run (every measured step):\n")
    print("| recipe | max abs(v_ratio - 1) | max abs(step_ratio - 1) | max abs(step_bias - 1) |")
    print("|---|---:|---:|---:|")
    for name in args.recipes.split(","):
        mine = [r for r in rows if r["recipe"] == name]
        if mine:
            print(
                f"| {name} | "
                + " | ".join(
                    f"{max(abs(r[key] - 1) for r in mine):.4f}" for key in ("v_ratio", "step_ratio", "step_bias")
                )
                + " |"
            )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
