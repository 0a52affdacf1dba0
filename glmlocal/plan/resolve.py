"""MODEL as the user names it (registry name, pulled model, .gguf, checkpoint directory) -> its Footprint, the
smaller quants to suggest when it does not fit, and a plan on the given or probed hardware. No printing."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from glmlocal.errors import InputError, PlanError
from glmlocal.plan import hardware
from glmlocal.plan.footprint import Footprint, footprint_from_gguf, footprint_from_spec
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.planner import Placement, plan
from glmlocal.plan.view import gib

if TYPE_CHECKING:  # imported when used: the hub client is not needed to plan a local GGUF
    from glmlocal.plan.published import SmallerQuants


def resolve_footprint(model: str, quant: str | None) -> tuple[Footprint, SmallerQuants | None, str, dict]:
    """(footprint, smaller-quant alternatives, where it came from in words, the same for --json) for MODEL.

    Sizes come from a local GGUF's header ("local-file"), the registry + our quant recipe ("recipe"), a
    checkpoint's config.json ("checkpoint-config"), or, for published-only quants (UD-Q2_K_XL...), the
    published files' headers read with Range requests and cached ("remote-header").
    """
    from glmlocal.models.registry import (
        find_model,
        is_recipe_quant,
        spec_from_checkpoint,
    )

    try:
        from glmlocal.models.store import resolve_model
    except ImportError:  # store not available: registry names and paths only
        resolve_model = None
    manifest = None
    if resolve_model is not None:
        r = resolve_model(model, quant=quant)
        kind, path, spec, quant, manifest = r.kind, r.path, r.spec, r.quant or quant, r.manifest
    else:
        p = Path(model).expanduser()
        kind = "gguf" if p.is_file() else "checkpoint" if p.is_dir() else "registry"
        path, spec = (p if kind != "registry" else None), find_model(model)
    if kind in ("pulled", "gguf"):
        fp = footprint_from_gguf(path)
        if kind == "pulled" and quant:
            fp = replace(fp, quant=quant)  # the registry's name (ud-q2_k_xl), not the file type's (q2_k)
        return fp, _alternatives(spec, fp), f"GGUF header of {path}", {"sizes_from": "local-file", "path": str(path)}
    if kind == "checkpoint":
        spec = spec_from_checkpoint(path)
    if spec is None:
        from glmlocal.models.registry import get_model

        spec = get_model(model)  # raises InputError listing the known names
    quant = quant or "q4_k_m"
    if kind == "registry" and not is_recipe_quant(quant):
        from glmlocal.plan.published import published_footprint

        fp, remote = published_footprint(spec, quant, revision=manifest.revision if manifest else None)
        how = "cached" if remote.cached else f"{gib(remote.fetched_bytes)} fetched"
        origin = (f"GGUF headers of {remote.repo}@{remote.commit[:12]}, {len(remote.files)} file(s) of "
                  f"{gib(remote.total_bytes)}, {how}, before download")
        return fp, _alternatives(spec, fp), origin, {"sizes_from": "remote-header", "remote": remote.describe()}
    fp = footprint_from_spec(spec, quant)
    if kind == "registry":
        return fp, _alternatives(spec, fp), f"models.toml + the {quant} recipe, before download", {"sizes_from": "recipe"}
    return fp, _alternatives(spec, fp), f"{path}/config.json", {"sizes_from": "checkpoint-config"}


def _alternatives(spec, fp: Footprint) -> SmallerQuants | None:
    """Quants smaller than `fp` (converted and published), sized lazily: only a no-fit plan looks at them."""
    if spec is None:
        return None
    from glmlocal.plan.published import SmallerQuants

    return SmallerQuants(spec, fp.file_bytes)


@dataclass(frozen=True)
class ModelPlan:
    """A plan for MODEL and what it was made from."""

    placement: Placement
    footprint: Footprint
    hardware: hardware.Hardware
    origin: str  # where the sizes came from, in words
    source: dict  # the same for --json


def plan_model(model: str, quant: str | None, options: PlanOptions) -> ModelPlan:
    """Resolve MODEL, probe (or take) the hardware, plan. PlanError names what would fit instead; MachineTooSmall
    (a PlanError) when nothing of the model can fit, with the smallest machine for it and for each model."""
    if options.ctx is not None and options.ctx <= 0:
        raise InputError(f"--ctx must be positive, got {options.ctx}")
    fp, smaller, origin, source = resolve_footprint(model, quant)
    hw = hardware.probe(options)
    if smaller is not None:  # published quants larger than RAM + VRAM are not worth sizing
        smaller.limit_bytes = sum(g.total for g in hw.gpus) + hw.ram_total
    try:
        placement = plan(fp, hw, ctx=options.ctx, kv_type=options.kv_type or "f16", alternatives=smaller or {},
                         n_ubatch=options.ubatch, mtp=options.mtp, n_seq=options.parallel)
    except PlanError as e:
        if smaller is None:
            raise
        from glmlocal.plan.minimum import too_small

        raise too_small(smaller.spec, hw) or smaller.explain(e) from None
    return ModelPlan(placement, fp, hw, origin, source)
