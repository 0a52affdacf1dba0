"""The planner's last two choices, once the context and the GPU layers are fixed: MTP on or off, and the ubatch.

1. MTP (when the model has a NextN block and the caller does not turn it off): the layout with MTP's weights,
   KV and compute beside the last layer (glmlocal.plan.mtp) must fit at the same context with the same layers on
   the GPUs (MTP never costs context or moves attention to the CPU; it only takes VRAM from routed experts). Left
   to the planner (mtp=None), it must also be expected to run at least MTP_MIN_GAIN times faster, at its best
   draft count (glmlocal.plan.estimate), than the plan without it (whose VRAM goes to experts): a smaller gain is
   within the model's error. Asked for (mtp=True), fitting is enough. Otherwise MTP is off and a note says why.
2. ubatch (unless the caller fixed one): among UBATCHES, the one with the shortest predicted time for a Budget.prompt_ref
   -token prompt whose layout fits with the same layers on the GPUs, keeps at least DECODE_KEEP of the decode
   speed of the base ubatch (a bigger ubatch grows the compute buffers on the GPU, leaving less room for
   experts) and the same context: like MTP, the ubatch only spends VRAM that would hold routed experts. When a
   bigger ubatch would need less context (a GPU full of attention and KV), a note says what --ubatch N at the
   largest context that fits would give, if that prompt is at least HINT_GAIN times faster.
   On a CPU the prompt is compute-bound whatever the ubatch (its weights' bytes per token fall as 1/T and are
   below the compute time from 512 on), so a CPU-only plan keeps 512 without searching; with experts in RAM and
   a GPU, each ubatch uploads the used experts over PCIe, so bigger ubatches amortise that upload.
n_batch = n_ubatch: llama.cpp gains nothing from more (its ubatches run one after the other), and the engine's
batch loop spends at most n_batch tokens of prompt per step, so running streams wait at most one ubatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from glmlocal.plan.estimate import (
    best,
    effective_speed,
    prompt_time,
    spec_estimates,
)
from glmlocal.plan.layout import Budget, Layout
from glmlocal.plan.placement import SpecEstimate
from glmlocal.plan.view import gib

UBATCHES = (512, 1024, 2048, 4096)
DECODE_KEEP = 0.97
HINT_GAIN = 1.5
MTP_MIN_GAIN = 1.05


@dataclass(frozen=True)
class Choice:
    """A tuned layout and what it is expected to do."""

    b: Budget
    lay: Layout
    tokens_per_s: float  # plain decoding
    estimates: tuple[SpecEstimate, ...]  # MTP, per draft count (empty when off)
    prompt_s: float  # a b.prompt_ref-token prompt
    notes: list[str] = field(default_factory=list)

    @property
    def speed(self) -> float:
        """Decode tokens/s with MTP at its best draft count when on."""
        return effective_speed(self.tokens_per_s, self.estimates)


Speed = Callable[[Budget, Layout], float]
# The layout for a budget (another ubatch, MTP on or off) with the base layout's GPU layers at its context (or, when
# `shrink`, at the largest context that fits them); None when it does not fit so.
Relayout = Callable[[Budget, bool], "Layout | None"]


def _at(b: Budget, relayout: Relayout, ubatch: int, mtp: bool, speed: Speed, *, shrink: bool) -> Choice | None:
    bb = replace(b, n_ubatch=ubatch, n_batch=ubatch, mtp=mtp)
    new = relayout(bb, shrink)
    if new is None or (mtp and new.mtp is None):
        return None
    tps = speed(bb, new)
    return Choice(bb, new, tps, spec_estimates(bb, new, tps) if mtp else (), prompt_time(bb, new))


def tune(b: Budget, lay: Layout, *, want_mtp: bool | None, ubatch: int | None, speed: Speed,
         relayout: Relayout) -> Choice:
    """MTP on or off, then the ubatch (module docstring); `ubatch` fixes it, None lets the prompt model choose."""
    base = ubatch or b.n_ubatch
    off = _at(b, relayout, base, False, speed, shrink=False)
    off = off or Choice(b, lay, speed(b, lay), (), prompt_time(b, lay))
    chosen, notes = off, []
    if want_mtp is not False and b.fp.mtp_layer is not None:
        on = _at(b, relayout, base, True, speed, shrink=False)
        chosen, notes = _mtp_choice(b, lay, off, on, asked=want_mtp is True)
    elif b.fp.n_nextn and b.fp.mtp_layer is None:
        notes.append("MTP off: this GGUF has no NextN block (converted with --no-mtp, or trunk-only)")
    if ubatch is None and lay.ngl:  # without GPUs the prompt is compute-bound at any ubatch: 512 stays
        chosen = _ubatch_choice(b, relayout, chosen, speed)
        notes += _ubatch_hint(b, relayout, chosen, speed)
    return replace(chosen, notes=notes)


def _mtp_choice(b: Budget, lay: Layout, off: Choice, on: Choice | None, *,
                asked: bool) -> tuple[Choice, list[str]]:
    if b.hw.gpus and lay.ngl and b.offload_gpu is None:
        return off, ["MTP off: not planned on devices without op offload (RPC, --no-op-offload)"]
    if on is None:
        return off, ["MTP off: its NextN weights, KV and compute buffer do not fit beside the last layer "
                     "at this context (a smaller --ctx or --kv-type q8_0 leaves room)"]
    if not asked and (best(on.estimates) is None or on.speed < MTP_MIN_GAIN * off.tokens_per_s):
        return off, [f"MTP off: expected {on.speed:.1f} tok/s with it vs {off.tokens_per_s:.1f} without, less than "
                     f"{MTP_MIN_GAIN}x (verifying drafts reads each extra token's experts; its VRAM goes to experts)"]
    return on, []


def _ubatch_choice(b: Budget, relayout: Relayout, base: Choice, speed: Speed) -> Choice:
    mtp = base.lay.mtp is not None
    floor = DECODE_KEEP * base.speed
    best_c = base
    for ub in UBATCHES:
        if ub <= base.b.n_ubatch:
            continue
        c = _at(b, relayout, ub, mtp, speed, shrink=False)
        if c is not None and c.speed >= floor and c.prompt_s < best_c.prompt_s * 0.99:
            best_c = c
    return best_c


def _ubatch_hint(b: Budget, relayout: Relayout, chosen: Choice, speed: Speed) -> list[str]:
    """When a bigger ubatch fits only with less context: what it would give (the largest ubatch that pays)."""
    mtp = chosen.lay.mtp is not None
    for ub in reversed(UBATCHES):
        if ub <= chosen.b.n_ubatch or _at(b, relayout, ub, mtp, speed, shrink=False) is not None:
            continue
        c = _at(b, relayout, ub, mtp, speed, shrink=True)
        if c is not None and c.prompt_s * HINT_GAIN <= chosen.prompt_s:
            return [f"--ubatch {ub} --ctx {c.lay.ctx} would process a {b.prompt_ref // 1000}K-token prompt in "
                    f"~{c.prompt_s:.0f} s instead of ~{chosen.prompt_s:.0f} s (a bigger compute buffer, less KV)"]
    return []


def mtp_note(c: Choice) -> list[str]:
    """What MTP costs and is expected to gain, in words."""
    m, lay = c.lay.mtp, c.lay
    if m is None:
        return []
    where = "the last GPU" if lay.ngl else "the CPU"
    experts = ("its routed experts too" if lay.mtp_experts_gpu or not lay.ngl
               else f"its routed experts ({gib(m.experts, 2)}) in RAM")
    gains = ", ".join(f"{e.n_draft} draft{'s' if e.n_draft > 1 else ''} {e.speedup:.2f}x" for e in c.estimates)
    top = best(c.estimates)
    return [f"MTP on: NextN block {gib(m.weights, 2)} + KV {gib(m.kv, 2)} + compute "
            f"{gib(m.compute, 2)} on {where} beside the last layer, {experts}",
            f"MTP expected speedup = (1 + k a_k) t(1) / (t(1+k) + k t_draft), a_k GLM-4.5-Air's published acceptance "
            f"({'/'.join(f'{e.acceptance:g}' for e in c.estimates)}), t() a step's bytes and FLOPs per device: "
            f"{gains}; best {top.n_draft} draft(s): ~{top.tokens_per_s:.1f} tok/s"]


def prompt_note(c: Choice) -> str:
    tps = c.b.prompt_ref / c.prompt_s if c.prompt_s else 0.0
    return (f"prompt ~{tps:.0f} tok/s at ubatch {c.b.n_ubatch}: a {c.b.prompt_ref / 1000:g}K-token prompt in "
            f"~{c.prompt_s:.0f} s (roofline per device + upload of RAM weights per ubatch; glmlocal.plan.speed)")
