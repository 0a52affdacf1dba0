"""`glmlocal plan`: resolve MODEL, probe (or take) the hardware, plan, and render it with Rich or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from glmlocal import hardware
from glmlocal.errors import InputError
from glmlocal.footprint import Footprint, footprint_from_gguf, footprint_from_spec
from glmlocal.planner import Placement, plan
from glmlocal.registry import QUANTS

GB = 1e9


@dataclass(frozen=True)
class PlanArgs:
    model: str
    quant: str | None = None
    ctx: int | None = None
    kv_type: str = "f16"
    gpu_mem: str | None = None
    ram: str | None = None
    cpu_only: bool = False
    threads: int | None = None
    gpu_bw: float | None = None
    cpu_bw: float | None = None
    as_json: bool = False


def resolve_footprint(model: str, quant: str | None) -> tuple[Footprint, dict[str, Footprint], str]:
    """(footprint, smaller-quant alternatives, description of where it came from) for MODEL."""
    from glmlocal.registry import find_model, spec_from_checkpoint

    try:
        from glmlocal.store import resolve_model
    except ImportError:  # store not available: registry names and paths only
        resolve_model = None
    if resolve_model is not None:
        r = resolve_model(model, quant=quant)
        kind, path, spec, quant = r.kind, r.path, r.spec, r.quant or quant
    else:
        p = Path(model).expanduser()
        kind = "gguf" if p.is_file() else "checkpoint" if p.is_dir() else "registry"
        path, spec = (p if kind != "registry" else None), find_model(model)
    if kind in ("pulled", "gguf"):
        fp = footprint_from_gguf(path)
        return fp, _alternatives(spec, fp.quant), f"GGUF header of {path}"
    if kind == "checkpoint":
        spec = spec_from_checkpoint(path)
    if spec is None:
        from glmlocal.registry import get_model

        spec = get_model(model)  # raises InputError listing the known names
    quant = quant or "q4_k_m"
    fp = footprint_from_spec(spec, quant)
    origin = f"models.toml + the {quant} recipe (before download)" if kind == "registry" else f"{path}/config.json"
    return fp, _alternatives(spec, quant), origin


def _alternatives(spec, quant: str) -> dict[str, Footprint]:
    """Footprints of the quants smaller than `quant`, smallest last (so the error names the best one)."""
    if spec is None or quant not in QUANTS:
        return {}
    smaller = QUANTS[: QUANTS.index(quant)]
    return {q: footprint_from_spec(spec, q) for q in reversed(smaller)}


def make_plan(args: PlanArgs) -> tuple[Placement, Footprint, hardware.Hardware, str]:
    """The library part of `glmlocal plan` (no printing)."""
    if args.ctx is not None and args.ctx <= 0:
        raise InputError(f"--ctx must be positive, got {args.ctx}")
    fp, alternatives, origin = resolve_footprint(args.model, args.quant)
    hw = hardware.probe(hardware.Overrides(gpu_mem=args.gpu_mem, ram=args.ram, cpu_only=args.cpu_only,
                                           cores=args.threads, gpu_bw_gbs=args.gpu_bw, cpu_bw_gbs=args.cpu_bw))
    placement = plan(fp, hw, ctx=args.ctx, kv_type=args.kv_type, alternatives=alternatives)
    return placement, fp, hw, origin


def run_plan(args: PlanArgs, console: Console | None = None) -> None:
    """Plan and print: a table per device, the llama.cpp flags and the notes (or JSON)."""
    console = console or Console()
    placement, fp, hw, origin = make_plan(args)
    if args.as_json:
        doc = {"model": fp.label, "quant": fp.quant, "footprint_source": origin,
               "file_bytes": fp.file_bytes, "weights_bytes": fp.weights_bytes,
               "kv_bytes_per_token": fp.kv_bytes_per_token(placement.type_k, placement.type_v),
               "hardware": asdict(hw), "placement": placement.to_dict()}
        console.file.write(json.dumps(doc, indent=2) + "\n")
        return
    console.print(_header(placement, fp, origin))
    console.print(device_table(placement))
    console.print(Panel(placement.llama_cpp_flags(), title="llama.cpp flags", expand=False))
    for note in [*hw.notes, *placement.notes]:
        console.print(f"[dim]- {note}[/]")


def _header(p: Placement, fp: Footprint, origin: str) -> str:
    kv = fp.kv_bytes_per_token(p.type_k, p.type_v) * p.n_ctx
    return (f"[bold]{fp.label} {fp.quant}[/]: {fp.weights_bytes / GB:.1f} GB of weights "
            f"(file {fp.file_bytes / GB:.1f} GB; from {origin})\n"
            f"context [bold]{p.n_ctx}[/] tokens, KV {p.type_k}/{p.type_v} = {kv / GB:.1f} GB; "
            f"estimated decode speed [bold]{p.est_tokens_per_s:.1f} tokens/s[/]")


def _layers_text(layers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 6) -> '0-2,5-6'."""
    if not layers:
        return "-"
    runs, start, prev = [], layers[0], layers[0]
    for i in [*layers[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}-{prev}" if prev != start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(runs)


def device_table(p: Placement) -> Table:
    """One column per device: which layers' attention and experts live there, and how many GB."""
    t = Table(title="placement", show_lines=False)
    t.add_column("")
    for d in p.devices:
        t.add_column(d.name, justify="right")
    rows = [
        ("layers (attention, shexp, router)", lambda d: _layers_text(d.layers)),
        ("layers (routed experts)", lambda d: _layers_text(d.expert_layers)),
        ("weights GB", lambda d: f"{d.weights / GB:.2f}"),
        ("KV cache GB", lambda d: f"{d.kv / GB:.2f}"),
        ("compute buffers GB", lambda d: f"{d.compute / GB:.2f}"),
        ("total / capacity GB", lambda d: f"{d.total / GB:.1f} / {d.capacity / GB:.1f}"),
        ("headroom GB", lambda d: f"{d.headroom / GB:.2f}"),
        ("read per token GB", lambda d: f"{d.bytes_per_token / GB:.2f}"),
        ("bandwidth GB/s", lambda d: f"{d.bandwidth / GB:.0f}"),
    ]
    for label, cell in rows:
        t.add_row(label, *(cell(d) for d in p.devices))
    return t
