"""`glmlocal plan MODEL --machines`: one model planned on every machine profile, with the best quant that fits.

Candidates are our converter's quants up to Q8_0 (BF16 doubles the bytes read per token for no measurable gain
over Q8_0, so it is never "best") and the model's published-only GGUFs (UD-Q2_K_XL...), sized from their headers
when cached or reachable; those that cannot be sized are reported, not guessed. Per machine the best quant is the
largest that runs without compromise: on a unified-memory machine everything on the GPU (now, or after raising
the OS limit within what the machine allows), elsewhere the full wanted context. When no quant manages that,
the largest that fits at all. Pure apart from the sizing callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from glmlocal.errors import GlmlocalError, PlanError
from glmlocal.models.registry import QUANTS, ModelSpec, normalize_quant
from glmlocal.plan.footprint import Footprint, footprint_from_spec
from glmlocal.plan.machines import Machine, machines
from glmlocal.plan.placement import Placement
from glmlocal.plan.planner import CTX_STEP, DEFAULT_CTX, plan, unified_raise
from glmlocal.plan.pool import with_gpu_limit

RECIPE_CANDIDATES = ("q4_k_m", "q6_k", "q8_0")


@dataclass(frozen=True)
class Fit:
    """The best quant for one machine (quant None: nothing sized fits; `why` says what the planner said)."""

    machine: Machine
    quant: str | None = None
    file_bytes: int = 0
    published: bool = False
    placement: Placement | None = None
    clean: bool = False  # everything on the GPU (unified) / the full wanted context (discrete)
    raise_to: int | None = None  # unified: the GPU limit the placement assumes, raised from the machine's
    default_tps: float = 0.0  # unified: the estimate at the machine's own limit, when raise_to is set
    why: str = ""


@dataclass(frozen=True)
class Survey:
    model: str
    fits: list[Fit]
    unsized: dict[str, str] = field(default_factory=dict)  # published quant -> why it could not be sized
    candidates: tuple[str, ...] = ()


Sizer = Callable[[ModelSpec, str], Footprint]  # (spec, published quant) -> its footprint (may raise GlmlocalError)


def candidates(spec: ModelSpec, quant: str | None,
               sizer: Sizer) -> tuple[list[tuple[str, Footprint, bool]], dict[str, str]]:
    """(quant, footprint, published?) largest file first, and the published quants that could not be sized."""
    if quant:
        names = [normalize_quant(quant)]
    else:
        names = [*RECIPE_CANDIDATES, *spec.published_only()]
    out, unsized = [], {}
    for q in names:
        if q in QUANTS:
            out.append((q, footprint_from_spec(spec, q), False))
            continue
        try:
            out.append((q, sizer(spec, q), True))
        except GlmlocalError as e:
            unsized[q] = e.message
    return sorted(out, key=lambda c: -c[1].file_bytes), unsized


def best_fit(m: Machine, cands: list[tuple[str, Footprint, bool]], ctx: int | None, kv_type: str) -> Fit:
    """The best candidate for machine `m` (see the module docstring)."""
    hw = m.hardware()
    fallback: Fit | None = None
    why = ""
    for q, fp, published in cands:
        want = -(-ctx // CTX_STEP) * CTX_STEP if ctx else min(fp.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX)
        try:
            p = plan(fp, hw, ctx=ctx, kv_type=kv_type, mtp=False)  # machines compare the model; MTP is an extra
        except PlanError as e:  # candidates go largest first: the last message is the smallest quant's
            why = e.message.replace(f"{fp.label} ", "", 1)
            continue
        fit = Fit(m, q, fp.file_bytes, published, p, _clean(p, m, want))
        if not fit.clean and m.unified:
            fit = _raised(fit, fp, ctx, kv_type, want)
        if fit.clean:
            return fit
        fallback = fallback or fit
    return fallback or Fit(m, why=why or "no candidate quant")


def _clean(p: Placement, m: Machine, want: int) -> bool:
    if m.unified:
        cpu = p.devices[-1]
        return not cpu.layers and not cpu.expert_layers and p.n_ctx >= want
    return p.n_ctx >= want


def _raised(fit: Fit, fp: Footprint, ctx: int | None, kv_type: str, want: int) -> Fit:
    """The same quant after raising the machine's GPU limit, when that puts everything on the GPU."""
    hw = fit.machine.hardware()
    target = unified_raise(fp, hw, ctx, kv_type)
    if target is None:
        return fit
    p = plan(fp, with_gpu_limit(hw, target), ctx=ctx, kv_type=kv_type, mtp=False)
    return Fit(fit.machine, fit.quant, fit.file_bytes, fit.published, p, _clean(p, fit.machine, want), target,
               fit.placement.est_tokens_per_s)


def survey(spec: ModelSpec | None, quant: str | None = None, *, ctx: int | None = None, kv_type: str = "f16",
           profiles: dict[str, Machine] | None = None, sizer: Sizer | None = None,
           footprint: Footprint | None = None) -> Survey:
    """Plan `spec`'s candidate quants (or just `footprint`, e.g. a local GGUF's) on every profile (default:
    machines.toml). `sizer` sizes a published quant (default: its GGUF headers, cached or fetched)."""
    if footprint is not None:
        cands, unsized = [(footprint.quant, footprint, False)], {}
    else:
        if sizer is None:
            from glmlocal.plan.published import published_footprint

            def sizer(s: ModelSpec, q: str) -> Footprint:
                return published_footprint(s, q)[0]
        cands, unsized = candidates(spec, quant, sizer)
    fits = [best_fit(m, cands, ctx, kv_type) for m in (profiles or machines()).values()]
    label = footprint.label if footprint is not None else spec.display
    return Survey(label, fits, unsized, tuple(q for q, _, _ in cands))
