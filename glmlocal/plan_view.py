"""`glmlocal plan`: resolve MODEL, probe (or take) the hardware, plan, and render it with Rich or JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from glmlocal import hardware
from glmlocal.errors import InputError, PlanError
from glmlocal.footprint import Footprint, footprint_from_gguf, footprint_from_spec
from glmlocal.planner import Placement, plan

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
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers (HOST:PORT) used as GPUs
    as_json: bool = False


def resolve_footprint(model: str, quant: str | None) -> tuple[Footprint, Mapping[str, Footprint], str, dict]:
    """(footprint, smaller-quant alternatives, where it came from in words, the same for --json) for MODEL.

    Sizes come from a local GGUF's header ("local-file"), the registry + our quant recipe ("recipe"), a
    checkpoint's config.json ("checkpoint-config"), or, for published-only quants (UD-Q2_K_XL...), the
    published files' headers read with Range requests and cached ("remote-header").
    """
    from glmlocal.registry import find_model, is_recipe_quant, spec_from_checkpoint

    try:
        from glmlocal.store import resolve_model
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
        from glmlocal.registry import get_model

        spec = get_model(model)  # raises InputError listing the known names
    quant = quant or "q4_k_m"
    if kind == "registry" and not is_recipe_quant(quant):
        from glmlocal.remote_gguf import published_footprint

        fp, remote = published_footprint(spec, quant, revision=manifest.revision if manifest else None)
        how = "cached" if remote.cached else f"{remote.fetched_bytes / 1e6:.1f} MB fetched"
        origin = (f"GGUF headers of {remote.repo}@{remote.commit[:12]}, {len(remote.files)} file(s) of "
                  f"{remote.total_bytes / 1e9:.1f} GB ({how}; before download)")
        return fp, _alternatives(spec, fp), origin, {"sizes_from": "remote-header", "remote": remote.describe()}
    fp = footprint_from_spec(spec, quant)
    if kind == "registry":
        return fp, _alternatives(spec, fp), f"models.toml + the {quant} recipe (before download)", {"sizes_from": "recipe"}
    return fp, _alternatives(spec, fp), f"{path}/config.json", {"sizes_from": "checkpoint-config"}


def _alternatives(spec, fp: Footprint) -> Mapping[str, Footprint]:
    """Quants smaller than `fp` (converted and published), sized lazily: only a no-fit plan looks at them."""
    if spec is None:
        return {}
    from glmlocal.remote_gguf import SmallerQuants

    return SmallerQuants(spec, fp.file_bytes)


def make_plan(args: PlanArgs) -> tuple[Placement, Footprint, hardware.Hardware, str, dict]:
    """The library part of `glmlocal plan` (no printing)."""
    if args.ctx is not None and args.ctx <= 0:
        raise InputError(f"--ctx must be positive, got {args.ctx}")
    fp, alternatives, origin, source = resolve_footprint(args.model, args.quant)
    hw = hardware.probe(hardware.Overrides(gpu_mem=args.gpu_mem, ram=args.ram, cpu_only=args.cpu_only,
                                           cores=args.threads, gpu_bw_gbs=args.gpu_bw, cpu_bw_gbs=args.cpu_bw,
                                           rpc=args.rpc))
    explain = getattr(alternatives, "explain", None)
    if explain is not None:  # published quants larger than RAM + VRAM are not worth sizing
        alternatives.limit_bytes = sum(g.total for g in hw.gpus) + hw.ram_total
    try:
        placement = plan(fp, hw, ctx=args.ctx, kv_type=args.kv_type, alternatives=alternatives)
    except PlanError as e:
        raise explain(e) if explain is not None else e
    return placement, fp, hw, origin, source


def run_plan(args: PlanArgs, console: Console | None = None) -> None:
    """Plan and print: a table per device, the llama.cpp flags and the notes (or JSON)."""
    console = console or Console()
    placement, fp, hw, origin, source = make_plan(args)
    flags = placement.llama_cpp_flags() + (f" --rpc {','.join(args.rpc)}" if args.rpc else "")
    if args.as_json:
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
