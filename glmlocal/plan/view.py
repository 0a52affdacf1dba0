"""How a Placement is shown: one device table (used by `glmlocal plan` and by chat / serve while loading) and
the summary rows above it. Rich renderables only; the caller prints them."""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from glmlocal.plan.placement import Placement

GB = 1e9


def layers_text(layers: tuple[int, ...]) -> str:
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
    t = Table(title="placement", show_lines=False, box=box.SIMPLE_HEAD)
    t.add_column("")
    for d in p.devices:
        t.add_column(d.name, justify="right")
    rows = [
        ("layers (attention, shexp, router)", lambda d: layers_text(d.layers)),
        ("layers (routed experts)", lambda d: layers_text(d.expert_layers)),
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


def summary_table(p: Placement, title: str) -> Table:
    """The load panel of chat and serve: GPU layers, overrides, context, KV, threads, speed, notes."""
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    over = p.tensor_overrides
    rows = [
        ("GPU layers", str(p.n_gpu_layers)),
        ("tensor overrides", f"{len(over)} (e.g. {over[0][0]} -> {over[0][1]})" if over else ""),
        ("context", str(p.n_ctx)),
        ("KV cache", f"{p.type_k}/{p.type_v}"),
        ("flash attention", str(p.flash_attn)),
        ("threads", str(p.n_threads)),
        ("est. speed", f"~{p.est_tokens_per_s:.1f} tok/s" if p.est_tokens_per_s > 0 else ""),
    ]
    rows += [("note", note) for note in p.notes]
    for key, value in rows:
        if value:
            table.add_row(Text(key, style="dim"), value)
    return table
