"""The doctor's RAM and disk checks, judged against what the GLM-4.x models need (glmlocal.plan.minimum).

A machine that cannot run any of them is told so plainly, with the smallest machine for each model (its smallest
quant known here, with the numbers) and what works on it instead; a machine that can is told which model fits.
"""

from __future__ import annotations

from pathlib import Path

from glmlocal.doctor.result import Check
from glmlocal.plan.minimum import Minimum, minimums
from glmlocal.plan.view import gib, minimum_lines, unsized_line, works_here


def _model_data(models: list[Minimum]) -> list[dict]:
    return [{"model": m.name, "quant": m.quant, "published": m.published, "file_bytes": m.file_bytes,
             "need_bytes": m.need_bytes, "ctx": m.ctx, "profiles": [p.name for p in m.profiles]} for m in models]


def ram_check(total: int, available: int, vram: int = 0, models: list[Minimum] | None = None) -> Check:
    """RAM, judged together with VRAM against every GLM-4.x model's smallest known quant. The machine's whole
    RAM counts (what it could free for a model), not what happens to be available now."""
    models = minimums() if models is None else models
    usable = total + vram
    detail = f"{gib(available)} of {gib(total)} available" + (f", {gib(vram)} VRAM" if vram else ", no GPU memory")
    data = {"total_bytes": total, "available_bytes": available, "vram_bytes": vram, "models": _model_data(models)}
    fits = [m for m in models if m.need_bytes <= usable]
    if fits:
        best = max(fits, key=lambda m: m.need_bytes)
        return Check("RAM", "ok", f"{detail}: enough for {best.display} {best.quant} (needs {gib(best.need_bytes)} "
                     "of RAM + VRAM)", data=data)
    maybe = [(m, u) for m in models for u in m.might_fit(usable)]
    if maybe:
        m, u = maybe[0]
        return Check("RAM", "warn", f"{detail}: this machine cannot run any GLM-4.x model at a quant sized here; "
                     f"the published {u.quant} of {m.display} (at least {gib(u.at_least)}) might: planning it reads "
                     "its size from the hub (a few MiB)", fix=f"glmlocal plan {m.name} --quant {u.quant}", data=data)
    more = ["the smallest machine for each GLM-4.x model (its smallest quant known here, "
            f"{models[0].ctx if models else 0} tokens of context):", *(f"  {line}" for line in minimum_lines(models))]
    more += [line for line in (unsized_line(models), works_here("this machine", usable, [])) if line]
    return Check("RAM", "warn", f"{detail}: this machine cannot run any GLM-4.x model", data=data, more=more)


def disk_check(root: Path, models: list[Minimum] | None = None) -> Check:
    """Free space in the model store against the smallest model file known here."""
    from glmlocal.models.store import free_bytes

    models = minimums() if models is None else models
    free = free_bytes(root)
    detail = f"{gib(free)} free at {root}"
    smallest = min(models, key=lambda m: m.file_bytes, default=None)
    if smallest is None:
        return Check("disk", "ok", detail, data={"free_bytes": free})
    data = {"free_bytes": free, "smallest_file_bytes": smallest.file_bytes}
    what = f"{smallest.display} {smallest.quant}, {gib(smallest.file_bytes)}"
    if free < smallest.file_bytes:
        return Check("disk", "warn", f"{detail}: too little for any GLM-4.x model (the smallest file known here is "
                     f"{what})", fix="free space or set GLMLOCAL_HOME to a larger disk", data=data)
    return Check("disk", "ok", f"{detail}: room for {what}", data=data)
