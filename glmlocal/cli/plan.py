"""`glmlocal plan`: resolve MODEL, probe (or take) the hardware, plan, and render it with Rich or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

from rich.console import Console
from rich.panel import Panel

from glmlocal.plan.footprint import Footprint
from glmlocal.plan.options import PlanOptions
from glmlocal.plan.placement import Placement
from glmlocal.plan.resolve import plan_model
from glmlocal.plan.view import GB, device_table


def run_plan(model: str, quant: str | None, options: PlanOptions, *, as_json: bool = False,
             console: Console | None = None) -> None:
    """Plan and print: a table per device, the llama.cpp flags and the notes (or JSON)."""
    console = console or Console()
    mp = plan_model(model, quant, options)
    placement, fp, hw, origin, source = mp.placement, mp.footprint, mp.hardware, mp.origin, mp.source
    flags = placement.llama_cpp_flags() + (f" --rpc {','.join(options.rpc)}" if options.rpc else "")
    if as_json:
        doc = {"model": fp.label, "quant": fp.quant, "footprint_source": origin, **source,
               "file_bytes": fp.file_bytes, "weights_bytes": fp.weights_bytes,
               "kv_bytes_per_token": fp.kv_bytes_per_token(placement.type_k, placement.type_v),
               "hardware": asdict(hw), "placement": {**placement.to_dict(), "llama_cpp_flags": flags}}
        console.file.write(json.dumps(doc, indent=2) + "\n")
        return
    console.print(_header(placement, fp, origin))
    console.print(device_table(placement))
    console.print(Panel(flags, title="llama.cpp flags", expand=False))
    for note in [*hw.notes, *placement.notes]:
        console.print(f"[dim]- {note}[/]")


def _header(p: Placement, fp: Footprint, origin: str) -> str:
    kv = fp.kv_bytes_per_token(p.type_k, p.type_v) * p.n_ctx
    return (f"[bold]{fp.label} {fp.quant}[/]: {fp.weights_bytes / GB:.1f} GB of weights "
            f"(file {fp.file_bytes / GB:.1f} GB; from {origin})\n"
            f"context [bold]{p.n_ctx}[/] tokens, KV {p.type_k}/{p.type_v} = {kv / GB:.1f} GB; "
            f"estimated decode speed [bold]{p.est_tokens_per_s:.1f} tokens/s[/]")


