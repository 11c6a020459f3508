"""AdamW for full-bfloat16 training: fp32 arithmetic, bf16 (or fp32, or int8) storage.

Every step upcasts weight, gradient and moments to fp32, computes the torch.optim.AdamW update
(decoupled weight decay, bias corrections, eps after sqrt(v_hat)) and rounds each stored tensor
once. What "rounds" means is the precision recipe:

    compensation="none"        nearest rounding. Updates smaller than half a bf16 ulp of the
                               weight are lost (`step(count_lost_updates=True)` counts them).
    compensation="stochastic"  the weight is rounded stochastically (unbiased), and so are the
                               bf16 moments unless moments_rounding="nearest" (torchao's variant).
    compensation="kahan"       the weight is rounded to nearest and what it loses is carried in a
                               bf16 buffer `kahan_comp` into the next step; moments and that
                               buffer are rounded stochastically unless moments_rounding="nearest"
                               (optimi's variant).

Compensation acts on bf16 weights only: an fp32 weight takes the fp32 result exactly, so for
fp32 parameters compensation is a no-op and no buffer is allocated. `moments_rounding` acts
on every bf16 moment (and the Kahan buffer), whatever the parameter dtype.

State per parameter (all tensors in `self.state[p]`, on the parameter's device):
    step                       0-dim fp32 tensor (CPU), as in torch.optim.AdamW
    exp_avg, exp_avg_sq        moments in the state dtype (fp32: 8 B/param, bf16: 4 B/param)
    exp_avg_codes, exp_avg_scale, exp_avg_sq_codes, exp_avg_sq_scale
                               int8 moments: uint8 codes (param shape) + fp32 scale per 256
                               elements (~2.03 B/param); tensors under 4096 elements keep bf16
    kahan_comp                 bf16, param shape (2 B/param), only for compensation="kahan"
Which of these a parameter has, and which random field rounds each of its bf16 buffers, is its
`ParamLayout` (layout.py, `AdamW.layout(p)`): decided once, from its group's recipe and its dtype
and size, when its state is initialised; the step, the foreach grouping, `load_state_dict`'s check
and `init_state` (which the memory planner calls on meta parameters) read it. It is not saved: the
recipe is, in the param groups, and the layout follows from it.

The random bits: one CPU torch.Generator seeded with `seed` draws, each step, one seed per
parameter and random field; each field's bits then come from a generator seeded with it
(numpy's PCG64DXSM on CPU, torch's Philox on accelerators: see rounding.py for why). Only the
first generator has state across steps; it is saved in
`state_dict()["param_groups"][0]["rng_state"]`, so a resumed run is bit-identical.

Sharded parameters (FSDP2 DTensors): the math runs on each rank's local shard, and every state
tensor is a DTensor sharded like its parameter (DCP saves each rank's part). int8 blocks are cut
from the local shard; their scales form a [shards, blocks] DTensor, one row per shard. The
per-parameter seeds are mixed with the shard's index, so ranks holding different shards draw
different bits, while replicas of one shard (HSDP, DDP) draw the same bits and stay identical.
The lost-update statistics are this rank's (its shards').

Two code paths share one update function (`_update`, written over lists of tensors):
`foreach=True` calls it with all tensors of a (dtype, layout, step) group at once through
torch._foreach_* ops - few kernel launches on a GPU; `foreach=False` calls it per tensor, and
on CPU per chunk of 2^18 elements so the fp32 temporaries stay in cache (on CPU that is faster
than foreach, hence the default: foreach on accelerators, chunked loop on CPU). Both give
bitwise identical results: each parameter draws its random bits from its own generators (one
per field), seeded per step from the optimizer's generator, so neither grouping nor chunking
changes the bits.

`compile=True` (the trainer's `compile.enable`) replaces `_update` on the per-tensor path by one
torch.compile'd kernel per tensor or CPU chunk (fused.py, which says why the math is written there a
second time, and what running it eagerly instead measured); the results agree with the eager path's
up to the last bits of the fp32 arithmetic (a stored bf16 value rarely differs, by one ulp).

Why not torchao's optimizers (`torchao.optim._AdamW(bf16_stochastic_round=True)`,
`AdamW8bit`)? They do run on CPU with torch 2.13 (torchao 0.18.0), and our int8 codes match
theirs exactly, but: their step always goes through torch.compile (no eager path, one recompile
per new shape), they round only the weights stochastically (the
bf16 moments are rounded to nearest), there is no Kahan variant and no lost-update diagnostic,
and their random bits come from the global RNG, which makes an exactly-resumable run depend on
saving global state. The tests use torchao as a cross-check when it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..distributed import is_dtensor, local
from . import fused, quant, sharding
from .layout import COMPENSATIONS, MOMENTS_ROUNDINGS, NO_FIELD, STATE_DTYPES, ParamLayout, StepScalars
from .rounding import field_generator, kahan_write_, random_fields, round_to_bf16_

_PARAM_DTYPES = (torch.float32, torch.bfloat16)
_CPU_CHUNK = 1 << 18  # elements per chunk on CPU (a multiple of quant.BLOCK)
_CPU_CHUNK_COMPILED = 1 << 20  # compile=True: no temporaries to keep in cache, fewer calls (BENCHMARKS.md)
_FOREACH_BATCH = 1 << 26  # elements per foreach call: bounds the fp32 temporaries


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"AdamW: {name}={value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class UpdateStats:
    """What the rounding of one step did to the bf16 weights (this rank's shards), from `step(count_lost_updates=True)`.

    tracked_elements: bf16 weight elements whose fp32 update was nonzero (fp32 weights lose nothing: not counted).
    lost_update_fraction: the share of those whose stored bf16 value did not change (0.0 when none was tracked).
    compensated_fraction: Kahan only (None unless some stepped parameter has a Kahan buffer): the share of the
        tracked elements whose update went into the compensation buffer instead.
    """

    tracked_elements: int
    lost_update_fraction: float
    compensated_fraction: float | None


class AdamW(torch.optim.Optimizer):
    """AdamW with fp32 math and bf16 / fp32 / int8 state; see the module docstring.

    Args:
        params: iterable of parameters or param-group dicts (fp32 or bf16 tensors).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        state_dtype: "auto" (the parameter's dtype), "float32", "bfloat16" or "int8".
        compensation: "none", "stochastic" or "kahan" (bf16 parameters only).
        moments_rounding: "auto" (stochastic unless compensation="none"), "nearest" or
            "stochastic"; how bf16 moments and the Kahan buffer are written.
        seed: seeds the optimizer's own generator (stochastic rounding).
        foreach: True/False, or None to pick (foreach on accelerators, chunked loop on CPU).
        compile: run each tensor's (CPU: each chunk's) update as one torch.compile'd kernel
            (fused.py); the first step compiles. Implies the per-tensor path.

    `step(count_lost_updates=True)` returns the step's `UpdateStats` (how many bf16 weight updates the
    rounding lost); `layout(p)` says how parameter p's state is stored.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        state_dtype: str = "auto",
        compensation: str = "none",
        moments_rounding: str = "auto",
        seed: int = 0,
        foreach: bool | None = None,
        compile: bool = False,
    ):
        if isinstance(lr, torch.Tensor) or not 0.0 <= float(lr):
            raise ValueError(f"AdamW: lr must be a float >= 0, got {lr!r}")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0.0:
            raise ValueError(f"AdamW: eps must be > 0, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay!r}")
        _check_choice("state_dtype", state_dtype, STATE_DTYPES)
        _check_choice("compensation", compensation, COMPENSATIONS)
        _check_choice("moments_rounding", moments_rounding, MOMENTS_ROUNDINGS)
        if foreach not in (None, True, False):
            raise ValueError(f"AdamW: foreach must be None, True or False, got {foreach!r}")
        if compile not in (True, False):
            raise ValueError(f"AdamW: compile must be True or False, got {compile!r}")
        defaults = dict(
            lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
            weight_decay=float(weight_decay), state_dtype=state_dtype,
            compensation=compensation, moments_rounding=moments_rounding, foreach=foreach,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in _PARAM_DTYPES:
                    raise ValueError(
                        f"AdamW: parameters must be float32 or bfloat16, got a {p.dtype} tensor "
                        f"of shape {tuple(p.shape)}"
                    )
        self.seed = int(seed)
        self.compile = bool(compile)
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
        # Decided once per parameter. Not in self.state: state_dict() and checkpoints hold the buffers only (the
        # layout follows from the recipe, which the param groups save).
        self._layouts: dict[torch.Tensor, ParamLayout] = {}

    def add_param_group(self, param_group: dict) -> None:
        for key, allowed in (("state_dtype", STATE_DTYPES), ("compensation", COMPENSATIONS),
                             ("moments_rounding", MOMENTS_ROUNDINGS)):
            if key in param_group:
                _check_choice(key, param_group[key], allowed)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ per-parameter layout

    def layout(self, p: torch.Tensor) -> ParamLayout:
        """How parameter `p`'s state is stored and rounded: decided when its state is initialised (or now)."""
        return self._layout(self._group_of(p), p)

    def init_state(self, p: torch.Tensor) -> dict:
        """Allocate (if needed) and return the state of parameter `p` without stepping.

        Works on meta parameters, so a memory planner can measure the state layout for free.
        """
        return self._init_state(self._group_of(p), p)

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("AdamW: this tensor is not one of the optimizer's parameters")

    def _layout(self, group: dict, p: torch.Tensor) -> ParamLayout:
        layout = self._layouts.get(p)
        if layout is None:
            layout = self._layouts[p] = ParamLayout.decide(
                state_dtype=group["state_dtype"], compensation=group["compensation"],
                moments_rounding=group["moments_rounding"], param_dtype=p.dtype, numel=p.numel(),
            )
        return layout

    def _init_state(self, group: dict, p: torch.Tensor) -> dict:
        state = self.state[p]
        if state:
            return state
        layout = self._layout(group, p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if layout.moments == "int8":
            nb = quant.num_blocks(p.numel())
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                state[f"{name}_codes"] = torch.full_like(
                    p, quant.zero_code(signed), dtype=torch.uint8,
                    memory_format=torch.contiguous_format,
                )
                state[f"{name}_scale"] = (sharding.sharded_block_scales(p) if is_dtensor(p) else
                                          torch.zeros(nb, dtype=torch.float32, device=p.device))
        else:
            dtype = getattr(torch, layout.moments)
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        if layout.kahan:
            state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    # ------------------------------------------------------------------ step

    def _use_foreach(self, group: dict, params: list[torch.Tensor]) -> bool:
        if self.compile:  # one fused kernel per tensor (or CPU chunk) needs no foreach batching
            return False
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return all(p.device.type != "cpu" for p in params)

    @torch.no_grad()
    def step(self, closure=None, *, count_lost_updates: bool = False):
        """One AdamW step of every parameter with a gradient.

        Returns the closure's loss (or None), as torch's optimizers do; with `count_lost_updates=True`, the
        step's `UpdateStats` instead (counting costs a few passes over the bf16 weights), so a closure is then
        refused: call it before the step.
        """
        if closure is not None and count_lost_updates:
            raise ValueError("AdamW.step: count_lost_updates=True returns the step's UpdateStats, not a loss; "
                             "call the closure before the step")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        counter = _LostUpdateCounter() if count_lost_updates else None
        for group in self.param_groups:
            self._step_group(group, counter)
        return counter.result() if counter is not None else loss

    def _step_group(self, group: dict, counter: _LostUpdateCounter | None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            _check_grad(p)
        # One seed per parameter and random field, in parameter order, so the random bits a
        # parameter gets do not depend on how the paths group or chunk it.
        seeds = torch.randint(0, 2**62, (len(params), 3), generator=self._generator).tolist()
        seeds = [sharding.mix_shard(row, sharding.shard_index(p)) for row, p in zip(seeds, params)]
        states = [self._init_state(group, p) for p in params]
        layouts = [self._layout(group, p) for p in params]
        for st in states:
            st["step"] += 1
        path = self._step_foreach if self._use_foreach(group, params) else self._step_loop
        path(group, params, states, layouts, seeds, counter)

    def _step_loop(self, group, params, states, layouts, seeds, counter):
        scalar_tensors = {}  # compiled: once per (step, device) - on a GPU each is a copy to it
        for p, st, layout, seed in zip(params, states, layouts, seeds):
            step = st["step"].item()
            scalars = StepScalars.of(group, step)
            gens = _field_generators(seed, layout.num_fields, p.device)
            contiguous, n = local(p).is_contiguous(), local(p).numel()
            compiled = self.compile and contiguous and fused.supports(layout.moments, n)  # the kernel takes flat views
            chunk = (_CPU_CHUNK_COMPILED if compiled else _CPU_CHUNK) if (p.device.type == "cpu" and contiguous) else n
            if compiled and (step, p.device) not in scalar_tensors:
                scalar_tensors[step, p.device] = scalars.as_tensor(p.device)
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                t = _Tensors.gather([p], [st], layout, a, b, chunk < n, flat=compiled)
                rand = random_fields(b - a, gens, p.device)
                if not compiled:
                    _update(t, layout, [rand], scalars, counter)
                    continue
                counts = fused.step(t.p[0], t.g[0], t.m[0], t.v[0], t.comp[0] if t.comp else None,
                                    t.m_scale[0] if t.m_scale else None, t.v_scale[0] if t.v_scale else None,
                                    rand, layout.fields, layout.moments, scalar_tensors[step, p.device],
                                    counter is not None)
                if counts is not None:
                    counter.add(*counts)

    def _step_foreach(self, group, params, states, layouts, seeds, counter):
        buckets: dict[tuple, list[int]] = {}
        for i, (p, st, layout) in enumerate(zip(params, states, layouts)):
            buckets.setdefault((p.dtype, p.device, layout, st["step"].item()), []).append(i)
        for (_, device, layout, step), idxs in buckets.items():
            scalars = StepScalars.of(group, step)
            for batch in _batches(idxs, [local(params[i]).numel() for i in idxs]):
                t = _Tensors.gather([params[i] for i in batch], [states[i] for i in batch], layout, 0, None, False)
                rand = [random_fields(local(params[i]).numel(),
                                      _field_generators(seeds[i], layout.num_fields, device), device)
                        for i in batch]
                _update(t, layout, rand, scalars, counter)

    # ------------------------------------------------------------------ state_dict

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["param_groups"][0]["rng_state"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()`; every buffer keeps its saved dtype (torch's default loader
        would cast fp32 moments and int8 scales to the parameter dtype) and is copied to the
        parameter's device."""
        groups = [dict(g) for g in state_dict["param_groups"]]
        rng_state = groups[0].pop("rng_state", None)
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"AdamW: the state dict has {len(groups)} parameter groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        for saved, ours in zip(groups, self.param_groups):
            for key in ("state_dtype", "compensation", "moments_rounding"):
                if key in saved and saved[key] != ours[key]:
                    raise ValueError(
                        f"AdamW: the state dict was saved with {key}={saved[key]!r}, this "
                        f"optimizer has {key}={ours[key]!r}; they must match to resume"
                    )
        saved_state = state_dict["state"]
        super().load_state_dict({"state": {}, "param_groups": groups})
        for saved, group in zip(groups, self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                if pid not in saved_state:
                    continue
                expected = set(self._layout(group, p).buffers)
                got = set(saved_state[pid])
                if got != expected:
                    raise ValueError(
                        f"AdamW: saved state for a parameter of shape {tuple(p.shape)} has "
                        f"buffers {sorted(got)}, this optimizer expects {sorted(expected)}"
                    )
                self.state[p] = {
                    k: (v.detach().clone() if k == "step" else v.detach().to(p.device, copy=True))
                    for k, v in saved_state[pid].items()
                }
        if rng_state is not None:
            self._generator.set_state(rng_state.cpu() if isinstance(rng_state, torch.Tensor)
                                      else torch.as_tensor(rng_state, dtype=torch.uint8))


def _check_grad(p: torch.Tensor) -> None:
    if p.grad.is_sparse:
        raise ValueError("AdamW: sparse gradients are not supported")
    if p.grad.dtype != p.dtype or p.grad.shape != p.shape:
        raise ValueError(
            f"AdamW: gradient {p.grad.dtype}{tuple(p.grad.shape)} does not match its "
            f"parameter {p.dtype}{tuple(p.shape)}"
        )


def _field_generators(seeds: list[int], n: int, device: torch.device) -> list:
    return [field_generator(s, device) for s in seeds[:n]]


def _batches(idxs: list[int], sizes: list[int]):
    batch, total = [], 0
    for i, n in zip(idxs, sizes):
        if batch and total + n > _FOREACH_BATCH:
            yield batch
            batch, total = [], 0
        batch.append(i)
        total += n
    if batch:
        yield batch


class _Tensors:
    """The storage tensors one `_update` call reads and writes (flat views for chunks)."""

    def __init__(self, p, g, m, v, comp, m_scale, v_scale):
        self.p, self.g, self.m, self.v, self.comp = p, g, m, v, comp
        self.m_scale, self.v_scale = m_scale, v_scale

    @staticmethod
    def gather(params, states, layout: ParamLayout, a, b, chunked, flat=False):
        int8 = layout.moments == "int8"
        flat = flat or chunked or int8  # int8 blocks run over the flattened tensor
        if flat and not all(local(x).is_contiguous() for x in params):
            raise ValueError("AdamW: int8 state needs contiguous parameters")

        def view(t):  # sharded tensors: the math runs on this rank's shard
            t = local(t)
            return t.view(-1)[a:b] if flat else t

        def scale_view(t, p):
            t = sharding.local_scale(t, local(p).numel())
            return t[a // quant.BLOCK: quant.num_blocks(b)] if chunked else t

        p = [view(x) for x in params]
        g = [view(x.grad) for x in params]
        if int8:
            m = [view(s["exp_avg_codes"]) for s in states]
            v = [view(s["exp_avg_sq_codes"]) for s in states]
            ms = [scale_view(s["exp_avg_scale"], x) for s, x in zip(states, params)]
            vs = [scale_view(s["exp_avg_sq_scale"], x) for s, x in zip(states, params)]
        else:
            m = [view(s["exp_avg"]) for s in states]
            v = [view(s["exp_avg_sq"]) for s in states]
            ms = vs = None
        comp = [view(s["kahan_comp"]) for s in states] if layout.kahan else None
        return _Tensors(p, g, m, v, comp, ms, vs)


def _f32(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 working copies (always copies, so in-place math never touches storage)."""
    return [t.to(torch.float32, copy=True) for t in ts]


def _field(rand: list[torch.Tensor], index: int) -> torch.Tensor | None:
    """Random field `index` of one tensor, or None (round to nearest)."""
    return rand[index] if index != NO_FIELD else None


def _update(t: _Tensors, layout: ParamLayout, rand: list, s: StepScalars, counter) -> None:
    """One AdamW step for lists of tensors of one layout, in fp32; the eager copy of the math.

    Mirrors torch.optim.AdamW's single-tensor path op for op, so fp32 parameters with fp32
    state get bitwise the same result. `rand[i]` are the random fields of tensor i.
    """
    g = [x.float() for x in t.g]  # read only: fp32 gradients are used as they are
    if layout.moments == "int8":
        m = [quant.dequantize(c, sc, True) for c, sc in zip(t.m, t.m_scale)]
        v = [quant.dequantize(c, sc, False) for c, sc in zip(t.v, t.v_scale)]
    elif layout.moments == "float32":
        m, v = t.m, t.v  # update the fp32 state in place
    else:
        m, v = _f32(t.m), _f32(t.v)

    torch._foreach_lerp_(m, g, s.one_minus_beta1)
    torch._foreach_mul_(v, s.beta2)
    torch._foreach_addcmul_(v, g, g, value=s.one_minus_beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, s.bc2_sqrt)
    torch._foreach_add_(denom, s.eps)

    if layout.kahan:
        _write_weights_kahan(t, m, denom, layout, rand, s, counter)
    else:
        _write_weights(t, m, denom, layout, rand, s, counter)
    _write_moments(t, m, v, layout, rand)


def _write_weights_kahan(t, m, denom, layout, rand, s, counter) -> None:
    """delta = -lr*wd*p - step_size*m/denom, applied to the bf16 weights through the compensation buffer."""
    pf = _f32(t.p)
    delta = torch._foreach_mul(pf, s.neg_lr_wd)
    torch._foreach_addcdiv_(delta, m, denom, value=s.neg_step_size)
    if counter is not None:
        old, comp_old = [x.clone() for x in t.p], [x.clone() for x in t.comp]
        nonzero = [d != 0 for d in delta]  # before kahan_write_, which clobbers delta
    for i in range(len(t.p)):
        kahan_write_(t.p[i], t.comp[i], pf[i], delta[i], _field(rand[i], layout.weight_field))
    if counter is not None:
        for i in range(len(t.p)):
            lost = nonzero[i] & (t.p[i] == old[i])
            counter.add(nonzero[i].count_nonzero(), lost.count_nonzero(),
                        (lost & (t.comp[i] != comp_old[i])).count_nonzero())


def _write_weights(t, m, denom, layout, rand, s, counter) -> None:
    """p = p * (1 - lr*wd) - step_size*m/denom, rounded into bf16 weights (fp32 weights: updated in place)."""
    if t.p[0].dtype == torch.float32:
        torch._foreach_mul_(t.p, s.decay)
        torch._foreach_addcdiv_(t.p, m, denom, value=s.neg_step_size)
        return
    pf = _f32(t.p)
    old = [x.clone() for x in t.p] if counter is not None else None
    torch._foreach_mul_(pf, s.decay)
    torch._foreach_addcdiv_(pf, m, denom, value=s.neg_step_size)
    # Counted on bit patterns (integer differences: cheaper than float compares and bool sums). A weight
    # whose fp32 result equals its old value keeps its bits under either rounding, so the changed
    # weights are a subset of the updated ones and lost = updated - changed.
    updated = ([(x.view(torch.int32) - o.float().view(torch.int32)).count_nonzero() for x, o in zip(pf, old)]
               if old is not None else None)  # before rounding, which clobbers pf
    for i in range(len(t.p)):
        round_to_bf16_(t.p[i], pf[i], _field(rand[i], layout.weight_field))
    if old is not None:
        for i in range(len(t.p)):
            changed = (t.p[i].view(torch.int16) - old[i].view(torch.int16)).count_nonzero()
            counter.add(updated[i], updated[i] - changed, None)


def _write_moments(t, m, v, layout, rand) -> None:
    """Store the fp32 moments (fp32 state was updated in place)."""
    if layout.moments == "int8":
        for i in range(len(t.p)):
            quant.quantize_(t.m[i], t.m_scale[i], m[i], True)
            quant.quantize_(t.v[i], t.v_scale[i], v[i], False)
    elif layout.moments == "bfloat16":
        for i in range(len(t.p)):
            round_to_bf16_(t.m[i], m[i], _field(rand[i], layout.exp_avg_field))
            round_to_bf16_(t.v[i], v[i], _field(rand[i], layout.exp_avg_sq_field))


class _LostUpdateCounter:
    """Accumulates the lost-update counts of one counted step (tensors; synced once, in `result`)."""

    def __init__(self):
        self.updated = self.lost = self.compensated = None
        self.kahan = False

    def add(self, updated, lost, compensated):
        """Counts (0-dim tensors) of one tensor: elements with a nonzero update, those of them whose bf16
        weight did not change, and (Kahan) those of the latter whose compensation buffer took the update."""
        self.updated = updated if self.updated is None else self.updated + updated
        self.lost = lost if self.lost is None else self.lost + lost
        if compensated is not None:
            self.kahan = True
            self.compensated = compensated if self.compensated is None else self.compensated + compensated

    def result(self) -> UpdateStats:
        n = int(self.updated) if self.updated is not None else 0
        compensated = (float(self.compensated) / n if n else 0.0) if self.kahan else None
        return UpdateStats(tracked_elements=n, lost_update_fraction=float(self.lost) / n if n else 0.0,
                           compensated_fraction=compensated)
