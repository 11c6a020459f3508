"""Which code maps should quantized Adam moments use? A replay of one run's gradients through candidate layouts.

    python benchmarks/moment_maps.py --out benchmarks/results/moment_maps.json

How the int8/int4 maps of leantrain/optim/quant.py were chosen. benchmarks/moment_bias.py measures the layouts the
optimizer has; this script measures layouts it does not have, cheaply: it records every gradient of one run (the
convergence model's "low" regime, recipe bf16-sr, seed 0: tensors of 4096 elements or more, as bf16), then replays
them through exact fp32 EMAs and through each candidate's quantized EMAs (stochastic codes, v never rounded to
zero), and reports moment_bias.py's v_ratio, step_ratio and step_bias over the run. The replay ignores the
optimizer's effect on its own trajectory (every candidate sees the same gradients), which is what moment_bias.py's
shadow moments measure as well. Written for clarity, not speed (float64 and torch.bucketize over the map).

Candidates: block-wise absmax scales (B elements) or Li et al.'s rank-1 normalization (each element scaled by the
smaller of its row's and its column's maximum); maps: bitsandbytes' dynamic map ("dynamic"), FlashOptim's
companded ones (m: 2x / (1 + |x|); v: sqrt), linear; "exact" leaves that moment in fp32 to isolate the other.
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

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def record_gradients(regime: str) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """[(shape, [steps, *shape] bf16 gradients)] of every tensor with at least 4096 elements."""
    import leantrain.train as lt
    from leantrain.config import load_config
    from leantrain.runplan import resolve

    grads: dict[int, tuple[tuple[int, ...], list[torch.Tensor]]] = {}
    build = lt.build_optimizer

    def build_recording(*args, **kwargs):
        opt = build(*args, **kwargs)

        def hook(optimizer, _args, _kwargs):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p.numel() >= 4096:
                        grads.setdefault(id(p), (tuple(p.shape), []))[1].append(p.grad.detach().bfloat16().clone())

        opt.register_step_post_hook(hook)
        return opt

    lt.build_optimizer = build_recording
    overrides = {
        **MODEL,
        "recipe": "bf16-sr",
        "optimizer.lr": REGIMES[regime]["optimizer.lr"],
        "training.steps": str(REGIMES[regime]["training.steps"]),
        "eval.interval": "0",
        "job.seed": "0",
        "job.dump_folder": tempfile.mkdtemp(),
    }
    lt.train(resolve(load_config(None, overrides)))
    lt.build_optimizer = build
    return [(shape, torch.stack(gs)) for shape, gs in grads.values()]


def _scales(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Each element's scale: its block's absmax ("b128": blocks of 128 consecutive elements) or rank-1."""
    a = x.abs()
    if norm == "rank1":
        rows = a.reshape(a.shape[0], -1)
        return torch.minimum(rows.amax(1, keepdim=True), rows.amax(0, keepdim=True)).view(a.shape)
    block = int(norm[1:])
    flat = a.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // block) * block, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded.view(-1, block).amax(1).repeat_interleave(block)[: flat.numel()].view(a.shape)


class Candidate:
    """One moment's storage: a sorted map of values in [-1, 1] or [0, 1], a normalization, stochastic codes."""

    def __init__(self, values, norm: str, signed: bool):
        self.qmap = torch.tensor(values, dtype=torch.float64)
        self.norm, self.signed = norm, signed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = _scales(x, self.norm)
        if self.signed:
            scale = scale / -self.qmap[0]  # the map's range (the dynamic map reaches only -0.993)
        y = x / scale.clamp(min=1e-38)
        lo = (torch.bucketize(y, self.qmap, right=True) - 1).clamp(0, len(self.qmap) - 2)
        a, b = self.qmap[lo], self.qmap[lo + 1]
        out = torch.where(torch.rand_like(y) < ((y - a) / (b - a)).clamp(0, 1), b, a)
        if not self.signed:
            out = out.clamp(min=self.qmap[self.qmap > 0][0])  # v never rounds to zero
        return out * scale


def replay(grads, m_store, v_store, every: int = 50) -> list[dict]:
    torch.manual_seed(0)
    states = [[torch.zeros(shape, dtype=torch.float64) for _ in range(4)] for shape, _ in grads]
    rows = []
    for t in range(grads[0][1].shape[0]):
        sums = dict(v_stored=0.0, v_exact=0.0, u_stored=0.0, u_exact=0.0, u_along=0.0)
        for (_, gs), st in zip(grads, states):
            g = gs[t].double()
            m, v, mq, vq = st
            m.mul_(BETA1).add_(g, alpha=1 - BETA1)
            v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
            mq, vq = mq * BETA1 + (1 - BETA1) * g, vq * BETA2 + (1 - BETA2) * g * g
            st[2] = m_store(mq) if m_store else mq
            st[3] = v_store(vq) if v_store else vq
            if (t + 1) % every == 0:
                bc1, bc2 = 1 - BETA1 ** (t + 1), 1 - BETA2 ** (t + 1)
                u_exact = (m / bc1) / ((v / bc2).sqrt() + EPS)
                u_stored = (st[2] / bc1) / ((st[3] / bc2).sqrt() + EPS)
                sums["v_stored"] += st[3].sum().item()
                sums["v_exact"] += v.sum().item()
                sums["u_stored"] += u_stored.abs().sum().item()
                sums["u_exact"] += u_exact.abs().sum().item()
                sums["u_along"] += (u_stored * u_exact.sign()).sum().item()
        if (t + 1) % every == 0:
            rows.append(
                dict(
                    step=t + 1,
                    v_ratio=sums["v_stored"] / sums["v_exact"],
                    step_ratio=sums["u_stored"] / sums["u_exact"],
                    step_bias=sums["u_along"] / sums["u_exact"],
                )
            )
    return rows


def candidates() -> dict[str, tuple[Candidate | None, Candidate | None]]:
    from leantrain.optim.quant import FORMATS

    def dynamic(signed, exponent_bits=7, total_bits=8):  # bitsandbytes' create_dynamic_map, as torchao builds it
        values, non_sign = [], total_bits - 1
        for i in range(exponent_bits):
            cells = 2 ** (i + non_sign - exponent_bits + (0 if signed else 1))
            grid = torch.linspace(0.1, 1, cells + 1)
            mids = ((grid[:-1] + grid[1:]) / 2.0) * (10 ** (i - (exponent_bits - 1)))
            values += mids.tolist() + ((-mids).tolist() if signed else [])
        return sorted(values + [0.0, 1.0])

    int8, int4 = FORMATS["int8"], FORMATS["int4"]
    sqrt4 = [(k / 15) ** 2 for k in range(16)]
    return {
        "int8 dynamic m + dynamic v, b256 (torchao's maps)": (
            Candidate(dynamic(True), "b256", True),
            Candidate(dynamic(False), "b256", False),
        ),
        "int8 dynamic m, exact v": (Candidate(dynamic(True), "b256", True), None),
        "int8 exact m, dynamic v": (None, Candidate(dynamic(False), "b256", False)),
        "int8 companded m, exact v": (Candidate(int8.map(True), "b256", True), None),
        "int8 exact m, companded (sqrt) v": (None, Candidate(int8.map(False), "b256", False)),
        "int8 companded m + v, b256 (bf16-int8)": (
            Candidate(int8.map(True), "b256", True),
            Candidate(int8.map(False), "b256", False),
        ),
        "int4 dynamic m, exact v": (Candidate(dynamic(True, 3, 4), "b128", True), None),
        "int4 companded m, exact v": (Candidate(int4.map(True), "b128", True), None),
        "int4 exact m, linear v, b128": (None, Candidate(int4.map(False), "b128", False)),
        "int4 exact m, linear v, b32": (None, Candidate(int4.map(False), "b32", False)),
        "int4 exact m, linear v, rank-1 (Li et al.)": (None, Candidate(int4.map(False), "rank1", False)),
        "int4 exact m, sqrt v, b128": (None, Candidate(sqrt4, "b128", False)),
        "int4 exact m, sqrt v, rank-1": (None, Candidate(sqrt4, "rank1", False)),
        "int4 exact m, dynamic v, b128": (None, Candidate(dynamic(False, 3, 4), "b128", False)),
        "int4 companded m + linear v, b128 (bf16-int4)": (
            Candidate(int4.map(True), "b128", True),
            Candidate(int4.map(False), "b128", False),
        ),
        "int4 companded m, b128 + int8 companded (sqrt) v, b256 (mixed)": (
            Candidate(int4.map(True), "b128", True),
            Candidate(int8.map(False), "b256", False),
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", default="low", choices=list(REGIMES))
    ap.add_argument("--only", default="", help="comma-separated: the candidates whose name contains one of these")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    grads = record_gradients(args.regime)
    results = {}
    print("| candidate | max abs(v_ratio - 1) | max abs(step_ratio - 1) | max abs(step_bias - 1) |")
    print("|---|---:|---:|---:|")
    for name, (m_store, v_store) in candidates().items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        rows = results[name] = replay(grads, m_store, v_store)
        print(
            f"| {name} | "
            + " | ".join(f"{max(abs(r[k] - 1) for r in rows):.4f}" for k in ("v_ratio", "step_ratio", "step_bias"))
            + " |",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
