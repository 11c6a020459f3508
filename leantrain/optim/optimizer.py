"""The optimizer's driver, `LeanOptimizer`, and its rules as optimizers: `AdamW`, `FactoredAdamW`, `Adafactor`.

The driver owns what every rule shares: the state and each parameter's layout (layout.py), chunking, the
finiteness gate, the lost-update statistics, the eager or compiled backend and the state dict. A rule (rules.py)
says what is computed; the stored formats are the codecs' (codecs.py). The train state, gradient release and the
planner use the driver's protocol only (`init_state`, `layout`, `step`, `step_parameter`, `uncount_step`,
`state_dict`), never a rule's name.

AdamW for full-bfloat16 training: fp32 arithmetic, bf16 (or fp32, int8, int4) storage.

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
on every bf16 moment, int8/int4 moment code (quant.py) and the Kahan buffer, whatever the parameter dtype.

State per parameter (all tensors in `self.state[p]`, on the parameter's device, contiguous):
    step                       0-dim fp32 tensor (CPU), as in torch.optim.AdamW
    exp_avg, exp_avg_sq        moments in the state dtype (fp32: 8 B/param, bf16: 4 B/param)
    exp_avg_codes, exp_avg_scale, exp_avg_sq_codes, exp_avg_sq_scale
                               int8 moments: uint8 codes (param shape) + fp32 scale per 256
                               elements (~2.03 B/param); int4: two codes per uint8 (param shape, last
                               dimension halved) + fp32 scale per 128 elements (~1.06 B/param);
                               int4-int8: exp_avg as int4, exp_avg_sq as int8 (~1.55 B/param);
                               tensors under 4096 elements (and int4: with an odd last dimension) keep bf16
    kahan_comp                 bf16, param shape (2 B/param), only for compensation="kahan"
    exp_avg_sq_row, exp_avg_sq_col
                               FactoredAdamW's matrices: v as fp32 row and column factors (factored.py), in place
                               of exp_avg_sq (or its codes and scale)
Which of these a parameter has, and which random field rounds each of its bf16 buffers, is its
`ParamLayout` (layout.py, `AdamW.layout(p)`): decided once, from its group's recipe and its dtype
and size, when its state is initialised; the step, `load_state_dict`'s check
and `init_state` (which the memory planner calls on meta parameters) read it. It is not saved: the
recipe is, in the param groups, and the layout follows from it.

The random bits (randbits.py) are a hash of each element's index, keyed by `seed`, the parameter's index among
the optimizer's parameters, its shard and the step: nothing is drawn and nothing needs saving, so a resumed run
is bit-identical. Ranks holding different shards of a parameter (FSDP2 DTensors) get different bits, replicas of
one shard (HSDP, DDP) the same bits, and stay identical.

Sharded parameters: the math runs on each rank's local shard, and every state tensor is a DTensor sharded like
its parameter (DCP saves each rank's part). int8/int4 blocks are cut from the local shard; their scales form a
[shards, blocks] DTensor, one row per shard. The lost-update statistics are this rank's (its shards').

The update of one tensor is one function, `update.elementwise_update`, run per tensor, and on CPU per chunk of 2^18
elements so the fp32 temporaries stay in cache. `compile=True` (the trainer's `compile.enable`) runs the same
function through torch.compile, one fused kernel per tensor (CPU: per chunk of 2^20); the results are bitwise
those of the eager path (update.py says how). There is no foreach path: torch's _foreach ops have no integer
forms for the random bits, and a second copy of the math could not be held bitwise to the compiled one. On a
GPU, where an eager step launches a few dozen kernels per tensor, compile.enable is the fast path.

Why not torchao's optimizers (`torchao.optim._AdamW(bf16_stochastic_round=True)`,
`AdamW8bit`)? They do run on CPU with torch 2.13 (torchao 0.18.0), and our int8 codes match
theirs exactly, but: their step always goes through torch.compile (no eager path, one recompile
per new shape), they round only the weights stochastically (the
bf16 moments are rounded to nearest), there is no Kahan variant and no lost-update diagnostic,
and their random bits come from the global RNG, which makes an exactly-resumable run depend on
saving global state. The tests use torchao as a cross-check when it is installed.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..distributed import is_dtensor, local
from ..precision import norm_from_squares
from . import factored, quant, randbits, sharding, update
from .layout import COMPENSATIONS, MOMENTS_ROUNDINGS, STATE_DTYPES, ParamLayout, StepScalars
from .rules import ADAFACTOR, ADAMW, FACTORED_ADAMW, Rule

_PARAM_DTYPES = (torch.float32, torch.bfloat16)
_CPU_CHUNK = 1 << 18  # elements per chunk on CPU (a multiple of quant.BLOCK)
_CPU_CHUNK_COMPILED = 1 << 20  # compile=True: no temporaries to keep in cache, fewer calls (BENCHMARKS.md)
_MAX_CHUNK = 1 << 30  # elsewhere: element indices stay within int32 (randbits)


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
    exp_avg_lost_fraction, exp_avg_sq_lost_fraction: the same for the moments stored in low precision (bf16
        values, int8 codes): the share of their elements whose fp32 result differed from the stored value but
        whose stored bf16 bits or int8 code did not change (an int8 value may still move with its block's
        scale). None when no stepped parameter stores its moments in low precision (fp32 moments lose nothing).
    """

    tracked_elements: int
    lost_update_fraction: float
    compensated_fraction: float | None
    exp_avg_lost_fraction: float | None = None
    exp_avg_sq_lost_fraction: float | None = None


class LeanOptimizer(torch.optim.Optimizer):
    """The driver of a rule (`rule`), with fp32 math and bf16 / fp32 / int8 / int4 state; see the module docstring.
    Its rules are its subclasses: `AdamW`, `FactoredAdamW` and `Adafactor`.

    Args:
        params: iterable of parameters or param-group dicts (fp32 or bf16 tensors).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        A param group with "factored": True holds matrices whose v the rule keeps as factors (FactoredAdamW).
        state_dtype: "auto" (the parameter's dtype), "float32", "bfloat16", "int8", "int4" or "int4-int8"
            (exp_avg int4, exp_avg_sq int8).
        compensation: "none", "stochastic" or "kahan" (bf16 parameters only).
        moments_rounding: "auto" (stochastic unless compensation="none"), "nearest" or
            "stochastic"; how bf16 moments, int8/int4 codes and the Kahan buffer are written.
        seed: keys the random bits of stochastic rounding (randbits.py), with each parameter's index and shard.
        compile: run each tensor's (CPU: each chunk's) update as one torch.compile'd kernel (update.py); the
            first step compiles. The results are bitwise those of the eager step.

    `step(count_lost_updates=True)` returns the step's `UpdateStats` (how many bf16 weight updates the
    rounding lost); `layout(p)` says how parameter p's state is stored.
    """

    rule: Rule

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
        if compile not in (True, False):
            raise ValueError(f"AdamW: compile must be True or False, got {compile!r}")
        defaults = dict(
            lr=float(lr),
            betas=(float(betas[0]), float(betas[1])),
            eps=float(eps),
            weight_decay=float(weight_decay),
            state_dtype=state_dtype,
            compensation=compensation,
            moments_rounding=moments_rounding,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group.get("factored") and not self.rule.factors_matrices:
                raise ValueError(
                    f"{self.rule.name}: a param group marked factored, but this rule keeps v per element "
                    f"(FactoredAdamW factors it)"
                )
            for p in group["params"]:
                if p.dtype not in _PARAM_DTYPES:
                    raise ValueError(
                        f"AdamW: parameters must be float32 or bfloat16, got a {p.dtype} tensor "
                        f"of shape {tuple(p.shape)}"
                    )
                if not local(p).is_contiguous():
                    raise ValueError(
                        f"AdamW: parameters must be contiguous (the update runs on flat views), got "
                        f"one of shape {tuple(p.shape)} and strides {tuple(local(p).stride())}"
                    )
        self.seed = int(seed)
        self.compile = bool(compile)
        # each parameter's random-bits key (randbits.tensor_key) and where this rank's part of it lies in the whole
        self._keys: dict[torch.Tensor, tuple[int, randbits.ElementBox]] = {}
        # Decided once per parameter. Not in self.state: state_dict() and checkpoints hold the buffers only (the
        # layout follows from the recipe, which the param groups save).
        self._layouts: dict[torch.Tensor, ParamLayout] = {}

    def add_param_group(self, param_group: dict) -> None:
        for key, allowed in (
            ("state_dtype", STATE_DTYPES),
            ("compensation", COMPENSATIONS),
            ("moments_rounding", MOMENTS_ROUNDINGS),
        ):
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
        # By identity, built once per set of group dicts (gradient release asks once per parameter and step;
        # load_state_dict and add_param_group make new group dicts, which rebuilds it).
        signature = tuple(map(id, self.param_groups))
        cached = self.__dict__.get("_groups_by_param")
        count = sum(len(g["params"]) for g in self.param_groups)
        if cached is None or cached[0] != signature or len(cached[1]) != count:
            cached = self._groups_by_param = (signature, {id(q): g for g in self.param_groups for q in g["params"]})
        group = cached[1].get(id(p))
        if group is None:
            raise ValueError(f"{self.rule.name}: this tensor is not one of the optimizer's parameters")
        return group

    def _layout(self, group: dict, p: torch.Tensor) -> ParamLayout:
        layout = self._layouts.get(p)
        if layout is None:
            layout = self._layouts[p] = ParamLayout.decide(
                state_dtype=group["state_dtype"],
                compensation=group["compensation"],
                moments_rounding=group["moments_rounding"],
                param_dtype=p.dtype,
                numel=p.numel(),
                last_dim=p.shape[-1] if p.ndim else 1,
                factored=self._factored(group, p),
                first_moment=self.rule.first_moment,
            )
        return layout

    def _factored(self, group: dict, p: torch.Tensor) -> bool:
        return bool(group.get("factored")) and self.rule.factors_matrices and p.ndim == 2

    def _init_state(self, group: dict, p: torch.Tensor) -> dict:
        state = self.state[p]
        if state:
            return state
        layout = self._layout(group, p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        names = ("exp_avg",) * layout.first_moment + ("exp_avg_sq",) * (not layout.factored)
        if layout.moments in quant.STORAGES:
            for name, signed, fmt in zip(("exp_avg", "exp_avg_sq"), (True, False), quant.STORAGES[layout.moments]):
                if name not in names:
                    continue
                code = quant.initial_code(signed, fmt)
                state[f"{name}_codes"] = (
                    sharding.packed_codes(p, code)
                    if fmt.bits == 4
                    else torch.full_like(p, code, dtype=torch.uint8, memory_format=torch.contiguous_format)
                )
                state[f"{name}_scale"] = (
                    sharding.sharded_block_scales(p, fmt)
                    if is_dtensor(p)
                    else torch.zeros(fmt.num_blocks(p.numel()), dtype=torch.float32, device=p.device)
                )
        else:
            dtype = getattr(torch, layout.moments)
            for name in names:
                state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        if layout.factored:
            state["exp_avg_sq_row"], state["exp_avg_sq_col"] = factored.allocate(p)
        if layout.kahan:
            state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None, *, count_lost_updates: bool = False):
        """One AdamW step of every parameter with a gradient.

        Returns the closure's loss (or None), as torch's optimizers do; with `count_lost_updates=True`, the
        step's `UpdateStats` instead (counting costs a few passes over the bf16 weights), so a closure is then
        refused: call it before the step.
        """
        if closure is not None and count_lost_updates:
            raise ValueError(
                "AdamW.step: count_lost_updates=True returns the step's UpdateStats, not a loss; "
                "call the closure before the step"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        counter = LostUpdateCounter() if count_lost_updates else None
        for group in self.param_groups:
            self._step_group(group, counter)
        return counter.result() if counter is not None else loss

    def _step_group(self, group: dict, counter: LostUpdateCounter | None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            _check_grad(p)
        scalars = {}  # per (step, device): on a GPU each is a copy to it
        for p in params:
            self._step_one(group, p, scalars, counter)

    @torch.no_grad()
    def step_parameter(
        self, p: torch.Tensor, counter: LostUpdateCounter | None = None, gate: torch.Tensor | None = None
    ) -> None:
        """The update of parameter `p` alone, with its gradient: what `step` does to it (gradient release,
        release.py, calls it from the backward).

        `gate`: a 0-dim bool tensor on p's device; where False, weights and state stay bitwise as they were (the
        update's `gate`, update.elementwise_update), except the step count, which lives on the host and so has been
        advanced: the caller, once it knows, takes it back with `uncount_step`."""
        _check_grad(p)
        self._step_one(self._group_of(p), p, {}, counter, gate)

    def uncount_step(self, p: torch.Tensor) -> None:
        """Take back the step count of a gated-off `step_parameter` (its update was not applied)."""
        self.state[p]["step"] -= 1

    def _step_one(
        self,
        group: dict,
        p: torch.Tensor,
        scalars: dict,
        counter: LostUpdateCounter | None,
        gate: torch.Tensor | None = None,
    ) -> None:
        state, layout = self._init_state(group, p), self._layout(group, p)
        state["step"] += 1
        step = int(state["step"].item())
        if (step, p.device) not in scalars:
            scalars[step, p.device] = StepScalars.of(group, step, self.rule.first_moment).as_tensor(p.device)
        key, box = self._key(p)
        keys = randbits.StepKeys(key, step, layout.num_fields, box)
        # per matrix first (the factors see the whole gradient), then element-wise, chunk by chunk
        col = (
            factored.update_(p, state["exp_avg_sq_row"], state["exp_avg_sq_col"], group["betas"][1], gate)
            if layout.factored
            else None
        )
        step_scalars = scalars[step, p.device]
        if self.rule.update_clip > 0:
            step_scalars = self._clip_step(p, state, layout, step_scalars, col)
        self._step_param(p, state, layout, keys, step_scalars, counter, gate, col)

    def _clip_step(self, p, state, layout: ParamLayout, scalars: torch.Tensor, col) -> torch.Tensor:
        """The step's scalars with the step size scaled so that p's step has an RMS of at most the rule's
        `update_clip` (Adafactor's update clipping): a first pass over p's gradient and v, chunk by chunk, sums
        u² for u = g / (sqrt(v_hat) + eps), the step before the lr (over every shard of p); on the device."""
        s = StepScalars(*scalars.unbind())
        n = local(p).numel()
        chunk = _CPU_CHUNK if p.device.type == "cpu" else _MAX_CHUNK
        chunk = _whole_rows(chunk, local(p).shape[1], layout.moments) if layout.factored else chunk
        total = torch.zeros((), dtype=torch.float32, device=p.device)
        for a in range(0, n, chunk):
            _, g, _, v, _, _, v_scale = _chunk(p, state, layout, a, min(n, a + chunk), chunk < n, col)
            g = g.float()
            vf = update.second_moment(g, v, v_scale, layout.moments, s, layout.factored, copy=True)
            total += (g / update.denominator(vf, s)).square().sum()
        rms = norm_from_squares(total, p) / math.sqrt(p.numel())
        factor = torch.clamp(self.rule.update_clip / rms, max=1.0)
        return torch.cat([scalars[:2], scalars[2:3] * factor, scalars[3:]])  # neg_step_size (StepScalars' order)

    def _key(self, p: torch.Tensor) -> tuple[int, randbits.ElementBox]:
        """Parameter p's random-bits key (the seed and p's index among all parameters) and the box of global indices
        this rank's part of it holds: every element draws the bits it would draw in one process."""
        key = self._keys.get(p)
        if key is None:
            index = next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)
            key = self._keys[p] = (randbits.tensor_key(self.seed, index), randbits.ElementBox.of(p))
        return key

    def _step_param(
        self, p, state, layout: ParamLayout, keys: randbits.StepKeys, scalars, counter, gate, col: torch.Tensor | None
    ) -> None:
        """One parameter's update, chunk by chunk: on CPU chunks keep the fp32 temporaries in cache; everywhere
        they keep element indices within int32 (randbits). Chunking does not change the result. col: a factored
        matrix's column factor over its mean (factored.update_); its chunks are whole rows."""
        n = local(p).numel()
        if n >= 1 << 32:
            raise ValueError(
                f"AdamW: a (local shard of a) parameter has {n} elements; at most 2^32 - 1 are "
                "supported (the random bits index elements with 32 bits)"
            )
        compiled = self.compile and update.supports(layout.moments, n)
        chunk = (_CPU_CHUNK_COMPILED if compiled else _CPU_CHUNK) if p.device.type == "cpu" else _MAX_CHUNK
        run = update.compiled_update if compiled else update.elementwise_update
        if layout.factored or keys.box.strided:  # chunks of whole local rows (the factors', a column shard's bits)
            chunk = _whole_rows(chunk, keys.box.local_cols, layout.moments)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            counts = run(
                *_chunk(p, state, layout, a, b, chunk < n, col),
                keys.tensor(a, p.device),
                layout.fields,
                layout.moments,
                scalars,
                counter is not None,
                gate,
                layout.factored,
                keys.box.strided,
            )
            if counts is not None:
                counter.add(counts)

    # ------------------------------------------------------------------ state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()`; every buffer keeps its saved dtype (torch's default loader
        would cast fp32 moments and int8 scales to the parameter dtype) and is copied to the
        parameter's device."""
        groups = [dict(g) for g in state_dict["param_groups"]]
        groups[0].pop("rng_state", None)  # the generator of versions before randbits.py: the bits now need no state
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{self.rule.name}: the state dict has {len(groups)} parameter groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        for saved, ours in zip(groups, self.param_groups):
            for key in ("state_dtype", "compensation", "moments_rounding"):
                if key in saved and saved[key] != ours[key]:
                    raise ValueError(
                        f"{self.rule.name}: the state dict was saved with {key}={saved[key]!r}, this "
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
                        f"{self.rule.name}: saved state for a parameter of shape {tuple(p.shape)} has "
                        f"buffers {sorted(got)}, this optimizer expects {sorted(expected)}"
                    )
                self.state[p] = {
                    k: (v.detach().clone() if k == "step" else v.detach().to(p.device, copy=True))
                    for k, v in saved_state[pid].items()
                }


def _check_grad(p: torch.Tensor) -> None:
    if p.grad.is_sparse:
        raise ValueError("AdamW: sparse gradients are not supported")
    if p.grad.dtype != p.dtype or p.grad.shape != p.shape:
        raise ValueError(
            f"AdamW: gradient {p.grad.dtype}{tuple(p.grad.shape)} does not match its "
            f"parameter {p.dtype}{tuple(p.shape)}"
        )


def _whole_rows(chunk: int, cols: int, moments: str) -> int:
    """A chunk of about `chunk` elements made of whole rows of `cols`, and (quantized m) of whole blocks."""
    block = quant.STORAGES[moments].block if moments in quant.STORAGES else 1
    rows_step = block // math.gcd(cols, block)  # rows per chunk: a multiple of this keeps the blocks whole
    return max(rows_step, chunk // cols // rows_step * rows_step) * cols


def _chunk(p, state, layout: ParamLayout, a: int, b: int, chunked: bool, col: torch.Tensor | None) -> tuple:
    """Flat views of elements [a, b) of p's local tensors: (p, g, m, v, comp, m_scale, v_scale); a factored
    layout's v is its rows' part of the row factor, its v_scale `col` (factored.update_)."""

    def flat(t):  # sharded tensors: the math runs on this rank's shard
        return local(t).view(-1)[a:b]

    def scales(t, fmt):
        t = sharding.local_scale(t, local(p).numel(), fmt)
        return t[a // fmt.block : fmt.num_blocks(b)] if chunked else t

    def codes(t, fmt):  # int4: two codes per byte
        per_byte = 8 // fmt.bits
        return local(t).view(-1)[a // per_byte : b // per_byte]

    storage = quant.STORAGES.get(layout.moments)
    if not layout.first_moment:
        m, m_scale = None, None
    elif storage is not None:
        m, m_scale = codes(state["exp_avg_codes"], storage.exp_avg), scales(state["exp_avg_scale"], storage.exp_avg)
    else:
        m, m_scale = flat(state["exp_avg"]), None
    if layout.factored:
        cols = local(p).shape[1]
        v, v_scale = local(state["exp_avg_sq_row"])[a // cols : b // cols], col
    elif storage is not None:
        v = codes(state["exp_avg_sq_codes"], storage.exp_avg_sq)
        v_scale = scales(state["exp_avg_sq_scale"], storage.exp_avg_sq)
    else:
        v, v_scale = flat(state["exp_avg_sq"]), None
    comp = flat(state["kahan_comp"]) if layout.kahan else None
    return flat(p), local(p.grad).reshape(-1)[a:b], m, v, comp, m_scale, v_scale


class LostUpdateCounter:
    """Accumulates the lost-update counts of one counted step (tensors; synced once, in `result`)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, counts: dict[str, torch.Tensor]) -> None:
        """The counts (0-dim tensors) of one tensor, as `update.elementwise_update` returns them: elements with a
        nonzero update and those of them whose bf16 weight did not change (bf16 weights), those of the latter
        whose compensation buffer took the update (Kahan), and per low-precision moment the elements whose fp32
        result changed and those of them whose stored value did not."""
        for name, value in counts.items():
            self.sums[name] = value if name not in self.sums else self.sums[name] + value

    def result(self) -> UpdateStats:
        values = torch.stack(list(self.sums.values())).tolist() if self.sums else []  # one host sync
        sums = dict(zip(self.sums, values))

        def share(part: str, whole: str) -> float | None:
            if whole not in sums:
                return None
            return sums[part] / sums[whole] if sums[whole] else 0.0

        return UpdateStats(
            tracked_elements=sums.get("updated", 0),
            lost_update_fraction=share("lost", "updated") or 0.0,
            compensated_fraction=share("compensated", "updated") if "compensated" in sums else None,
            exp_avg_lost_fraction=share("exp_avg_lost", "exp_avg_updated"),
            exp_avg_sq_lost_fraction=share("exp_avg_sq_lost", "exp_avg_sq_updated"),
        )


class AdamW(LeanOptimizer):
    """AdamW (rules.ADAMW): m and v per element."""

    rule = ADAMW


class FactoredAdamW(LeanOptimizer):
    """AdamW with a factored v for the matrices of the param groups marked "factored" (rules.FACTORED_ADAMW)."""

    rule = FACTORED_ADAMW


class Adafactor(LeanOptimizer):
    """No first moment, factored v for the matrices of the groups marked "factored", update clipping
    (rules.ADAFACTOR). betas[0] is not used."""

    rule = ADAFACTOR


OPTIMIZERS: dict[str, type[LeanOptimizer]] = {cls.rule.name: cls for cls in (AdamW, FactoredAdamW, Adafactor)}
# The keywords a rule's optimizer takes from the config's optimizer section (config.Optimizer names them alike)
HYPERPARAMETERS = tuple(
    name
    for name in inspect.signature(LeanOptimizer.__init__).parameters
    if name not in ("self", "params", "seed", "compile")
)
