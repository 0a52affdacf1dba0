"""`glmlocal plan`: resolve MODEL, probe (or take) the hardware, plan, and render it with Rich or JSON."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict

import typer
from rich.console import Console
from rich.text import Text

from glmlocal.plan.footprint import Footprint
from glmlocal.plan.minimum import MachineTooSmall
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.placement import Placement
from glmlocal.plan.resolve import plan_model
from glmlocal.plan.view import (
    cli_console,
    device_table,
    gib,
    minimum_lines,
    mtp_text,
    prompt_text,
    unsized_line,
    works_here,
)


def run_plan(model: str, quant: str | None, options: PlanOptions, *, as_json: bool = False,
             console: Console | None = None) -> None:
    """Plan and print: a table per device, the llama.cpp flags and the notes (or JSON)."""
    console = console or cli_console()
    try:
        mp = plan_model(model, quant, options)
    except MachineTooSmall as e:
        too_small(e, as_json=as_json, out=console if as_json else cli_console(stderr=True))
        raise typer.Exit(1) from None
    placement, fp, hw, origin, source = mp.placement, mp.footprint, mp.hardware, mp.origin, mp.source
    flags = placement.llama_cpp_flags() + (f" --rpc {shlex.quote(','.join(options.rpc))}" if options.rpc else "")
    if as_json:
        doc = {"model": fp.label, "quant": fp.quant, "footprint_source": origin, **source,
               "file_bytes": fp.file_bytes, "weights_bytes": fp.weights_bytes,
               "kv_bytes_per_token": fp.kv_bytes_per_token(placement.type_k, placement.type_v),
               "hardware": asdict(hw), "placement": {**placement.to_dict(), "llama_cpp_flags": flags}}
        console.file.write(json.dumps(doc, indent=2) + "\n")
        return
    console.print(_header(placement, fp, origin))
    console.print(device_table(placement))
    # The flags as one plain line (no box, no wrapping, regexes shell-quoted): paste it after llama-server's -m.
    console.print(Text("llama.cpp flags (llama-server -m MODEL.gguf ...):", style="bold"))
    console.print(Text(flags), soft_wrap=True)
    for note in [*hw.notes, *placement.notes]:
        console.print(Text(f"- {note}", style="dim"))


def _header(p: Placement, fp: Footprint, origin: str) -> Text:
    kv = fp.kv_bytes_per_token(p.type_k, p.type_v) * p.n_ctx
    return Text.assemble((f"{fp.label} {fp.quant}", "bold"), f": {gib(fp.weights_bytes)} of weights "
                         f"(file {gib(fp.file_bytes)}; from {origin})\ncontext ", (str(p.n_ctx), "bold"),
                         f" tokens, KV {p.type_k}/{p.type_v} = {gib(kv)}; estimated decode speed ",
                         (f"{p.est_tokens_per_s:.1f} tokens/s", "bold"),
                         *([f"; MTP {mtp_text(p)}"] if p.mtp else []),
                         *([f"\nprompt {prompt_text(p)}"] if p.est_ttft_s else []))




def too_small(e: MachineTooSmall, *, as_json: bool, out: Console) -> None:
    """The straight answer when nothing of the model fits: the smallest machine for each GLM-4.x model (its
    smallest quant known here, with the numbers) and what works on this one; JSON in bytes."""
    if as_json:
        doc = {"fits": False, "error": e.one_line(), "machine": e.label, "usable_bytes": e.usable,
               "smallest": [asdict(m) for m in e.models], "runs_here": [m.name for m in e.fits]}
        out.file.write(json.dumps(doc, indent=2) + "\n")
        return
    out.print(Text(f"error: {e.message}", style="red"))
    out.print(f"the smallest machine for each GLM-4.x model (its smallest quant known here, "
              f"{e.minimum.ctx} tokens of context):", highlight=False)
    for line in minimum_lines(e.models):
        out.print(Text(f"  {line}"))
    for line in (unsized_line(e.models), works_here(e.label, e.usable, e.fits)):
        if line:
            out.print(Text(line))
