"""`glmlocal plan MODEL --machines`: one table across every machine profile (machines.toml): fits or not, the best
quant that fits (ours or published), context, estimated tokens/s. Rich or JSON."""

from __future__ import annotations

import json

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from glmlocal.errors import InputError
from glmlocal.plan.survey import Fit, Survey, survey
from glmlocal.plan.view import GIB, cli_console


def run_machines(model: str, quant: str | None, *, ctx: int | None = None, kv_type: str = "f16",
                 as_json: bool = False, console: Console | None = None) -> None:
    """Plan MODEL on every profile and print the table (or JSON). MODEL: a registry name (every candidate quant)
    or anything `glmlocal plan` takes (its one footprint)."""
    console = console or cli_console()
    if ctx is not None and ctx <= 0:
        raise InputError(f"--ctx must be positive, got {ctx}")
    result = _survey(model, quant, ctx, kv_type)
    if as_json:
        console.file.write(json.dumps(to_json(result), indent=2) + "\n")
        return
    console.print(machines_table(result))
    if result.unsized:
        console.print(Text(f"- published quants not sized: {', '.join(result.unsized)} "
                           f"({next(iter(result.unsized.values()))}); `glmlocal plan {model} --quant QUANT` sizes "
                           "one from its GGUF headers when online", style="dim"))
    console.print(Text("- best = the largest quant (up to q8_0) with everything on the GPU (unified memory) or the "
                       "full context (GPU + RAM); estimates: bytes read per token / (bandwidth x 0.75 GPU, 0.6 CPU), "
                       "not calibrated per backend", style="dim"))


def _survey(model: str, quant: str | None, ctx: int | None, kv_type: str) -> Survey:
    from glmlocal.models.registry import find_model

    spec = find_model(model)
    if spec is not None:
        return survey(spec, quant, ctx=ctx, kv_type=kv_type)
    from glmlocal.plan.resolve import resolve_footprint

    fp, _, _, _ = resolve_footprint(model, quant)
    return survey(None, ctx=ctx, kv_type=kv_type, footprint=fp)


def _memory(f: Fit) -> str:
    m = f.machine
    if m.unified:
        return f"{m.memory / GIB:.0f} GiB unified (GPU {m.gpu_limit / GIB:.1f} GiB)"
    vram = " + ".join(f"{g.vram / GIB:.0f} GiB" for g in m.gpus)
    return f"{m.memory / GIB:.0f} GiB RAM + {vram} VRAM"


def _status(f: Fit) -> tuple[str, str]:
    """(fits column, note column) for one machine."""
    if f.placement is None:  # the smallest quant's no-fit message, in fewer words
        why = f.why.replace("tokens of context", "ctx").replace(f"{f.machine.hardware().label} has ", "")
        return "[red]no[/]", why.replace(" (one unified pool)", "").replace(" (VRAM + RAM)", "")
    p = f.placement
    if f.raise_to is not None:
        u = f.machine.hardware().unified
        return ("[yellow]yes, limit raised[/]", f"GPU limit {u.gpu_limit / GIB:.1f} -> {f.raise_to / GIB:.0f} GiB: "
                f"{u.raise_command(f.raise_to)} ({f.default_tps:.1f} tok/s without)")
    if f.clean:
        return "[green]yes[/]", "all on the GPU" if f.machine.unified else ""
    cpu = p.devices[-1]
    if f.machine.unified and (cpu.layers or cpu.expert_layers):
        return "[yellow]partly on CPU[/]", next((n for n in p.notes if "GPU limit" in n), "")
    return "[yellow]less context[/]", next((n for n in reversed(p.notes) if "context reduced" in n), "")


def machines_table(result: Survey) -> Table:
    t = Table(title=f"{result.model} on every machine profile", box=box.SIMPLE_HEAD, title_justify="left")
    for col, just in (("machine", "left"), ("memory", "left"), ("backend", "left"), ("fits", "left"),
                      ("best quant", "left"), ("file GiB", "right"), ("context", "right"), ("est. tok/s", "right"),
                      ("note", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for f in result.fits:
        fits, note = _status(f)
        p = f.placement
        quant = (f.quant or "-") + (" (published)" if f.published else "")
        t.add_row(f.machine.name, _memory(f), f.machine.backend, fits, quant if p else "-",
                  f"{f.file_bytes / GIB:.1f}" if p else "-", str(p.n_ctx) if p else "-",
                  f"{p.est_tokens_per_s:.1f}" if p else "-", note)
    return t


def to_json(result: Survey) -> dict:
    rows = []
    for f in result.fits:
        p = f.placement
        rows.append({"machine": f.machine.name, "display": f.machine.display, "backend": f.machine.backend,
                     "unified": f.machine.unified, "fits": p is not None, "clean": f.clean, "quant": f.quant,
                     "published": f.published, "file_bytes": f.file_bytes, "n_ctx": p.n_ctx if p else None,
                     "est_tokens_per_s": p.est_tokens_per_s if p else None, "gpu_limit_raised_to": f.raise_to,
                     "est_tokens_per_s_without_raise": f.default_tps if f.raise_to else None,
                     "llama_cpp_flags": p.llama_cpp_flags() if p else None, "why": f.why or None})
    return {"model": result.model, "candidates": list(result.candidates), "unsized": result.unsized,
            "machines": rows}
