"""Time one optimizer step of each leantrain optimizer variant (AdamW, FactoredAdamW) against torch.optim.AdamW.

The parameters are shaped like a ~15M-parameter Llama (embedding, per-layer attention and
SwiGLU matrices, RMSNorm weights, output head). Each variant gets its own copy of the same
parameters and gradients; the variants run interleaved (one step each, round after round), so
a slow phase of the machine hits all of them alike. Reported: median step time, the ratio
to torch.optim.AdamW(foreach=True) on parameters of the same dtype, and the first step's time (for the
compiled variants: the compile, with inductor's caches off so that it is a cold compile).

    .venv/bin/python benchmarks/optimizer_step.py --out benchmarks/optimizer_step.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # first step of a compiled variant = a cold compile
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leantrain.optim import AdamW, FactoredAdamW  # noqa: E402
from leantrain.precision import grad_squares  # noqa: E402


def llama_shapes(dim=384, n_layers=6, ffn_dim=1024, vocab=8192, n_kv_heads_dim=None):
    kv = n_kv_heads_dim or dim
    shapes = [(vocab, dim)]
    for _ in range(n_layers):
        shapes += [(dim, dim), (kv, dim), (kv, dim), (dim, dim)]  # wq wk wv wo
        shapes += [(ffn_dim, dim), (ffn_dim, dim), (dim, ffn_dim)]  # w1 w3 w2
        shapes += [(dim,), (dim,)]  # attention_norm, ffn_norm
    shapes += [(dim,), (vocab, dim)]  # norm, output
    return shapes


def _torchao_sr(ps):
    """torchao's AdamW with stochastically rounded bf16 weights (its moments are rounded to nearest); compiled."""
    from torchao.optim import _AdamW

    return _AdamW(ps, lr=1e-3, bf16_stochastic_round=True)


def _compiled_torch(ps):
    """torch.optim.AdamW(foreach=True) with its step compiled (torch.compile(opt.step), as torch's docs show)."""
    opt = torch.optim.AdamW(ps, lr=1e-3, foreach=True)
    opt.step = torch.compile(opt.step)
    return opt


def _counting(opt: AdamW) -> AdamW:
    """Every step counts lost updates, as the trainer's logged steps do."""
    opt.step = functools.partial(opt.step, count_lost_updates=True)
    return opt


def _per_parameter(opt: AdamW, gated: bool) -> AdamW:
    """Each parameter's update on its own, with its gradient's squares (for the norm), as gradient release runs them
    in the backward (optim/release.py). gated: the squares' finiteness is the update's gate (release now);
    otherwise the host reads it and skips the update (release before the gate: a host sync per parameter, free on
    a CPU)."""
    params = [p for group in opt.param_groups for p in group["params"]]

    def step():
        for p in params:
            finite = torch.isfinite(grad_squares(p.grad))
            if gated:
                opt.step_parameter(p, gate=finite)
            elif bool(finite):
                opt.step_parameter(p)

    opt.step = step
    return opt


def _factored(**kwargs):
    """FactoredAdamW as the trainer builds it: the blocks' matrices (every 2-D tensor but the embedding and the
    output head) factored, the rest per element."""

    def make(ps):
        blocks = [p for p in ps[1:-1] if p.ndim == 2]
        rest = [p for p in ps if all(p is not q for q in blocks)]
        return FactoredAdamW([{"params": blocks, "factored": True}, {"params": rest}], lr=1e-3, **kwargs)

    return make


def _released(gated: bool, **kwargs):
    return lambda ps: _per_parameter(AdamW(ps, lr=1e-3, **kwargs), gated)


# name -> (parameter dtype, factory); torch baselines first
VARIANTS = {
    "torch AdamW foreach (fp32)": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    "torch AdamW foreach (bf16)": (torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    "torch AdamW for-loop (bf16)": (torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False)),
    # Peers: plain bf16 with torch's fused AdamW (torchtitan's training.dtype=bfloat16 step), and torchao's
    # stochastically rounding AdamW (compiled by torchao itself)
    "torch AdamW fused (bf16)": (torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    "torch AdamW foreach (bf16), compiled": (torch.bfloat16, _compiled_torch),
    "torchao _AdamW bf16_stochastic_round": (torch.bfloat16, _torchao_sr),
    "fp32 (auto)": (torch.float32, lambda ps: AdamW(ps, lr=1e-3)),
    "bf16 none": (torch.bfloat16, lambda ps: AdamW(ps, lr=1e-3)),
    "bf16 stochastic": (torch.bfloat16, lambda ps: AdamW(ps, lr=1e-3, compensation="stochastic")),
    "bf16 stochastic, nearest moments": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, compensation="stochastic", moments_rounding="nearest"),
    ),
    "bf16 kahan": (torch.bfloat16, lambda ps: AdamW(ps, lr=1e-3, compensation="kahan")),
    "bf16 kahan, nearest moments": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, compensation="kahan", moments_rounding="nearest"),
    ),
    "bf16 int8 (stochastic)": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, state_dtype="int8", compensation="stochastic"),
    ),
    "bf16 int8, nearest codes": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, state_dtype="int8", compensation="stochastic", moments_rounding="nearest"),
    ),
    "bf16 int4 (stochastic)": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, state_dtype="int4", compensation="stochastic"),
    ),
    "bf16 int4-int8 (stochastic)": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, state_dtype="int4-int8", compensation="stochastic"),
    ),
    "bf16 fp32-state": (torch.bfloat16, lambda ps: AdamW(ps, lr=1e-3, state_dtype="float32")),
    # A logged step: the trainer counts lost updates in it (metrics.log_freq).
    "bf16 none, lost-update meter on": (torch.bfloat16, lambda ps: _counting(AdamW(ps, lr=1e-3))),
    "bf16 stochastic, lost-update meter on": (
        torch.bfloat16,
        lambda ps: _counting(AdamW(ps, lr=1e-3, compensation="stochastic")),
    ),
    # compile=True (the trainer's compile.enable): each tensor's step as one torch.compile'd kernel
    "fp32 (auto), compiled": (torch.float32, lambda ps: AdamW(ps, lr=1e-3, compile=True)),
    "bf16 none, compiled": (torch.bfloat16, lambda ps: AdamW(ps, lr=1e-3, compile=True)),
    "bf16 stochastic, compiled": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, compensation="stochastic", compile=True),
    ),
    "bf16 kahan, compiled": (torch.bfloat16, lambda ps: AdamW(ps, lr=1e-3, compensation="kahan", compile=True)),
    "bf16 int8 (stochastic), compiled": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, state_dtype="int8", compensation="stochastic", compile=True),
    ),
    "bf16 int4 (stochastic), compiled": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, state_dtype="int4", compensation="stochastic", compile=True),
    ),
    "bf16 int4-int8 (stochastic), compiled": (
        torch.bfloat16,
        lambda ps: AdamW(ps, lr=1e-3, state_dtype="int4-int8", compensation="stochastic", compile=True),
    ),
    # FactoredAdamW (recipes bf16-int8-factored, bf16-int4-int8-factored)
    "bf16 int8-factored (stochastic)": (torch.bfloat16, _factored(state_dtype="int8", compensation="stochastic")),
    "bf16 int8-factored (stochastic), compiled": (
        torch.bfloat16,
        _factored(state_dtype="int8", compensation="stochastic", compile=True),
    ),
    "bf16 int4-int8-factored (stochastic), compiled": (
        torch.bfloat16,
        _factored(state_dtype="int4-int8", compensation="stochastic", compile=True),
    ),
    # optimizer.in_backward's updates, one parameter at a time: the NaN/Inf check on the host, and as the gate
    "bf16 stochastic, per parameter": (torch.bfloat16, _released(False, compensation="stochastic")),
    "bf16 stochastic, per parameter, gated": (torch.bfloat16, _released(True, compensation="stochastic")),
    "bf16 stochastic, per parameter, compiled": (
        torch.bfloat16,
        _released(False, compensation="stochastic", compile=True),
    ),
    "bf16 stochastic, per parameter, gated, compiled": (
        torch.bfloat16,
        _released(True, compensation="stochastic", compile=True),
    ),
    "bf16 int8 (stochastic), per parameter, compiled": (
        torch.bfloat16,
        _released(False, state_dtype="int8", compensation="stochastic", compile=True),
    ),
    "bf16 int8 (stochastic), per parameter, gated, compiled": (
        torch.bfloat16,
        _released(True, state_dtype="int8", compensation="stochastic", compile=True),
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="VARIANT",
        help="run this variant (repeatable; the torch foreach baselines always run)",
    )
    ap.add_argument(
        "--profile",
        default=None,
        metavar="VARIANT",
        help="instead of timing: the torch.profiler table of 3 steps of this variant (after 2 warm-up)",
    )
    args = ap.parse_args()
    unknown = set(args.only or []) | ({args.profile} if args.profile else set())
    if unknown - set(VARIANTS):
        ap.error(f"unknown variant(s) {sorted(unknown - set(VARIANTS))}; choose from {list(VARIANTS)}")
    if args.profile:
        args.only = [args.profile]
    names = [n for n in VARIANTS if n.startswith("torch AdamW foreach")]
    names += [n for n in VARIANTS if n not in names and (args.only is None or n in args.only)]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = llama_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)

    gen = torch.Generator().manual_seed(0)
    master = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    runs = {}
    for name in names:
        dtype, make = VARIANTS[name]
        ps = [torch.nn.Parameter(m.to(device, dtype)) for m in master]
        for p, g in zip(ps, grads):
            p.grad = g.to(device, dtype)
        runs[name] = (ps, make(ps), [])
    first = {}

    if args.profile:
        from torch.profiler import profile

        ps, opt, _ = runs[args.profile]
        for _ in range(2):
            opt.step()
        with profile() as prof:
            for _ in range(3):
                opt.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for r in range(args.warmup + args.repeats):
        for name, (ps, opt, times) in runs.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            dt = time.perf_counter() - t0
            if r == 0:
                first[name] = dt
            if r >= args.warmup:
                times.append(dt)

    base = {
        torch.float32: statistics.median(runs["torch AdamW foreach (fp32)"][2]),
        torch.bfloat16: statistics.median(runs["torch AdamW foreach (bf16)"][2]),
    }
    compiled = runs.get("torch AdamW foreach (bf16), compiled")
    compiled_base = statistics.median(compiled[2]) if compiled else None
    rows = []
    for name, (ps, opt, times) in runs.items():
        dtype = VARIANTS[name][0]
        state_bytes = sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for k, t in st.items()
            if k != "step" and isinstance(t, torch.Tensor)
        )
        med = statistics.median(times)
        rows.append(
            dict(
                variant=name,
                param_dtype=str(dtype).replace("torch.", ""),
                median_ms=med * 1e3,
                min_ms=min(times) * 1e3,
                ratio_to_torch_foreach=med / base[dtype],
                first_step_s=first.get(name),
                ratio_to_torch_foreach_compiled=(
                    med / compiled_base if compiled_base and dtype == torch.bfloat16 else None
                ),
                state_bytes_per_param=state_bytes / numel,
            )
        )

    print(
        f"{numel / 1e6:.1f}M parameters in {len(shapes)} tensors, {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"median of {args.repeats} interleaved steps\n"
    )
    print(
        "| variant | params | median ms | ratio to torch foreach (same dtype) | ratio to torch foreach compiled "
        "(bf16) | state B/param | first step s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        vs_compiled = r["ratio_to_torch_foreach_compiled"]
        print(
            f"| {r['variant']} | {r['param_dtype']} | {r['median_ms']:.1f} | "
            f"{r['ratio_to_torch_foreach']:.2f} | {'' if vs_compiled is None else f'{vs_compiled:.2f}'} | "
            f"{r['state_bytes_per_param']:.2f} | {r['first_step_s']:.2f} |"
        )
    if args.out:
        meta = dict(
            numel=numel,
            tensors=len(shapes),
            device=str(device),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            machine=platform.machine(),
            processor=platform.processor(),
            repeats=args.repeats,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
