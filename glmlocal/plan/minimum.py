"""The smallest machine each GLM-4.x model runs on: the straight answer for a machine too small for it.

Per registry chat model (not its FP8 / Base twins, which size the same): the smallest quant whose size is known
here (our converter's from the recipe; published ones whose GGUF headers are cached), the RAM + VRAM it needs
with MIN_CTX tokens of context (the planner on one memory pool, searched to 0.1 GiB), and the machine profiles
(machines.toml) that run it, smallest first. A published quant whose headers are not cached is not sized (that
needs the network); its bit class still bounds it from below (a 2-bit GGUF stores at least 2.0625 bits per
weight, IQ2_XXS), so a machine below every bound is told plainly that nothing fits, without a trip online.
Pure apart from reading cached headers; no printing, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from glmlocal.errors import GlmlocalError, PlanError
from glmlocal.models.registry import QUANTS, ModelSpec, all_models
from glmlocal.plan.footprint import Footprint, footprint_from_spec
from glmlocal.plan.hardware import DEFAULT_CPU_BW, GIB, Hardware
from glmlocal.plan.machines import Machine, machines
from glmlocal.plan.planner import MIN_CTX, plan
from glmlocal.plan.survey import best_fit
from glmlocal.plan.view import gib
from quantize.ggml import BLOCK_SIZES, GGMLType

STEP = GIB // 10  # the need is searched to 0.1 GiB
# The fewest bits per weight a quant of each bit class stores: its smallest llama.cpp type.
_FLOOR_TYPE = {1: GGMLType.IQ1_S, 2: GGMLType.IQ2_XXS, 3: GGMLType.IQ3_XXS, 4: GGMLType.IQ4_XS,
               5: GGMLType.Q5_K, 6: GGMLType.Q6_K, 8: GGMLType.Q8_0}


@dataclass(frozen=True)
class ProfileFit:
    """A machine profile that runs the model at that quant."""

    name: str
    memory: int  # RAM + VRAM (a unified machine: its one pool), bytes
    est_tokens_per_s: float


@dataclass(frozen=True)
class Unsized:
    """A published quant not sized here: no smaller than `at_least` bytes of weights (its bit class)."""

    quant: str
    at_least: int


@dataclass(frozen=True)
class Minimum:
    """What running `display` takes at its smallest known quant."""

    name: str
    display: str
    quant: str
    published: bool
    file_bytes: int
    need_bytes: int  # RAM + VRAM, one pool, with `ctx` tokens of context
    ctx: int
    profiles: tuple[ProfileFit, ...]  # smallest first
    unsized: tuple[Unsized, ...]  # published quants that might be smaller, smallest bound first

    def might_fit(self, usable: int) -> tuple[Unsized, ...]:
        """The unsized published quants a machine with `usable` bytes cannot be ruled out for."""
        return tuple(u for u in self.unsized if u.at_least <= usable)


def bits_floor(quant: str) -> float | None:
    """Fewest bits per weight a GGUF of this quant class stores ('ud-q2_k_xl' -> 2.0625); None if unknown."""
    m = re.search(r"(?:^|[^a-z])i?q(\d)", quant)
    kind = _FLOOR_TYPE.get(int(m.group(1))) if m else None
    if kind is None:
        return None
    block, size = BLOCK_SIZES[kind]
    return size * 8 / block


def need_bytes(fp: Footprint, ctx: int = MIN_CTX) -> int:
    """The least RAM (one pool, no GPU) the planner runs `fp` in with `ctx` tokens of context, to 0.1 GiB."""
    def fits(units: int) -> bool:
        ram = units * STEP
        try:
            plan(fp, Hardware((), ram, ram, 8, DEFAULT_CPU_BW), ctx=ctx)
        except PlanError:
            return False
        return True

    lo, hi = fp.weights_bytes // STEP, -(-2 * fp.file_bytes // STEP) + 200
    while lo < hi:  # smallest units that fit: fits() is monotone in the memory
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo * STEP


def _memory(m: Machine) -> int:
    return m.memory if m.unified else m.memory + sum(g.vram for g in m.gpus)


def _cached_published(spec: ModelSpec) -> tuple[list[tuple[str, Footprint]], list[str]]:
    """(quant, footprint) of the published-only quants whose headers are cached; the names of the others."""
    from glmlocal.models.remote import cached_total_bytes
    from glmlocal.plan.published import published_footprint

    sized, unsized = [], []
    for q in spec.published_only():
        g = spec.gguf[q]
        try:
            if cached_total_bytes(g.repo, g.pattern) is not None:  # cached: reading it needs no network
                sized.append((q, published_footprint(spec, q)[0]))
                continue
        except GlmlocalError:
            pass  # an unusable cached header: as good as not sized
        unsized.append(q)
    return sized, unsized


def minimum(spec: ModelSpec, profiles: dict[str, Machine] | None = None) -> Minimum:
    """The smallest known quant of `spec`, what it needs, and the smallest profiles that run it."""
    sized, unsized = _cached_published(spec)
    cands = [(q, footprint_from_spec(spec, q), False) for q in QUANTS] + [(q, fp, True) for q, fp in sized]
    quant, fp, published = min(cands, key=lambda c: c[1].file_bytes)
    runs = []
    for m in (profiles or machines()).values():
        fit = best_fit(m, [(quant, fp, published)], None, "f16")
        if fit.placement is not None:
            runs.append(ProfileFit(m.name, _memory(m), fit.placement.est_tokens_per_s))
    params = footprint_from_spec(spec, "bf16").weights_bytes / 2  # BF16: two bytes per weight
    bounds = [Unsized(q, int(params * bits / 8)) for q in unsized if (bits := bits_floor(q)) is not None]
    return Minimum(spec.name, spec.display, quant, published, fp.file_bytes, need_bytes(fp), MIN_CTX,
                   tuple(sorted(runs, key=lambda r: r.memory)),
                   tuple(sorted((u for u in bounds if u.at_least < fp.file_bytes), key=lambda u: u.at_least)))


def main_models() -> list[ModelSpec]:
    """The models a user picks from: chat models that are not a variant (FP8 / Base) of another."""
    return [s for s in all_models() if s.chat and s.variant_of is None]


def minimums(profiles: dict[str, Machine] | None = None) -> list[Minimum]:
    """minimum() of every main model, smallest need first."""
    return sorted((minimum(s, profiles) for s in main_models()), key=lambda m: m.need_bytes)


def usable_bytes(hw: Hardware) -> int:
    """RAM + VRAM a machine offers a model, as the planner counts it before its reserves (a unified GPU's
    memory is the RAM already counted)."""
    return hw.ram_available + sum(g.total for g in hw.gpus if not g.unified)


class MachineTooSmall(PlanError):
    """No quant of the model fits the machine, nor could a published one not sized here: the straight answer.
    `minimum` is the model's; `models` every main model's (what the smallest machine for each is)."""

    def __init__(self, minimum: Minimum, models: list[Minimum], hw: Hardware):
        self.minimum, self.models, self.label, self.usable = minimum, models, hw.label, usable_bytes(hw)
        self.fits = [m for m in models if m.need_bytes <= self.usable]
        m = minimum
        smallest = next(iter(m.profiles), None)
        super().__init__(
            f"{hw.label} cannot run {m.display}: its smallest quant known here, {m.quant} ({gib(m.file_bytes)} "
            f"file), needs {gib(m.need_bytes)} of RAM + VRAM with {m.ctx} tokens of context; {hw.label} has "
            f"{gib(self.usable)} available",
            hint=(f"the smallest machine profile that runs it: {smallest.name}, {gib(smallest.memory)}; "
                  if smallest else "") + f"`glmlocal plan {m.name} --machines` compares them")


def too_small(spec: ModelSpec, hw: Hardware) -> MachineTooSmall | None:
    """MachineTooSmall when even `spec`'s smallest known quant needs more than `hw` has and no unsized published
    quant could be smaller than that; None when something (a smaller quant or context) may still fit."""
    own = minimum(spec)
    usable = usable_bytes(hw)
    if own.need_bytes <= usable or own.might_fit(usable):
        return None
    return MachineTooSmall(own, minimums(), hw)
