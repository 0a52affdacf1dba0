"""How a Placement is shown: one device table (used by `glmlocal plan` and by chat / serve while loading) and
the summary rows above it. Rich renderables only; the caller prints them.

Units, in every command: byte counts (memory, files, bytes read per token) in binary units with the unit printed
every time (GiB, as --gpu-mem and --ram take them; MiB for small ones); rates in decimal units per second
(memory bandwidth in GB/s as datasheets give it, downloads in MB/s); JSON in bytes and bytes/s.
"""

from __future__ import annotations

import io
import sys
from typing import TYPE_CHECKING, TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from glmlocal.plan.placement import Placement

if TYPE_CHECKING:  # the minimum module plans on every profile: imported only where a machine is too small
    from glmlocal.plan.minimum import Minimum

GIB = 1024**3
MIB = 1024**2
GB = 1e9  # rates only: bandwidth in GB/s
NO_WRAP_WIDTH = 100_000  # a pipe has no width: lines go out whole


def gib(n: float, digits: int = 1) -> str:
    """Bytes as GiB with the unit: 72975748384 -> '68.0 GiB'; under 1 GiB in MiB ('310.6 MiB')."""
    if abs(n) < GIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / GIB:.{digits}f} GiB"


class _Unpadded(io.TextIOBase):
    """A pipe's end of the console: each line without the trailing blanks Rich pads table cells with (at a width
    of NO_WRAP_WIDTH a table row would end in hundreds of spaces)."""

    def __init__(self, out: TextIO):
        self.out, self.pending = out, ""

    @property
    def encoding(self) -> str:
        return getattr(self.out, "encoding", None) or "utf-8"

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.out.write(line.rstrip(" ") + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.out.write(self.pending)
            self.pending = ""
        self.out.flush()


def cli_console(*, stderr: bool = False, file: TextIO | None = None) -> Console:
    """The console a command prints on. A terminal gets Rich at its width with text soft-wrapped (the terminal
    folds long lines, copying one gives it back whole); a pipe or file gets no wrapping at all (lines as
    long as they are, without padding) and no colour codes, so `glmlocal ... | grep` and pasted flags see
    exactly one line each."""
    stream = file or (sys.stderr if stderr else sys.stdout)
    console = Console(file=stream, soft_wrap=True)
    if not console.is_terminal:
        console = Console(file=_Unpadded(stream), soft_wrap=True, width=NO_WRAP_WIDTH)
    return console


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
    """One column per device: which layers' attention and experts live there, and how many GiB."""
    t = Table(title="placement", show_lines=False, box=box.SIMPLE_HEAD)
    t.add_column("")
    for d in p.devices:
        t.add_column(d.name, justify="right")
    rows = [
        ("layers (attention, shexp, router)", lambda d: layers_text(d.layers)),
        ("layers (routed experts)", lambda d: layers_text(d.expert_layers)),
        ("weights GiB", lambda d: f"{d.weights / GIB:.2f}"),
        ("KV cache GiB", lambda d: f"{d.kv / GIB:.2f}"),
        ("compute buffers GiB", lambda d: f"{d.compute / GIB:.2f}"),
        *([("MTP (NextN, its KV, buffers) GiB", lambda d: f"{d.mtp / GIB:.2f}")] if p.mtp else []),
        ("total / capacity GiB", lambda d: f"{d.total / GIB:.1f} / {d.capacity / GIB:.1f}"),
        ("headroom GiB", lambda d: f"{d.headroom / GIB:.2f}"),
        ("read per token GiB", lambda d: f"{d.bytes_per_token / GIB:.2f}"),
        ("bandwidth GB/s", lambda d: f"{d.bandwidth / GB:.0f}"),
    ]
    for label, cell in rows:
        t.add_row(label, *(cell(d) for d in p.devices))
    return t


def mtp_text(p: Placement) -> str:
    """'on: 2 drafts per step, ~101.8 tok/s expected (1.30x)', or '' when MTP is off."""
    best = next((e for e in p.mtp_estimates if e.n_draft == p.mtp_draft), None)
    if not p.mtp or best is None:
        return ""
    return (f"on: {best.n_draft} draft{'s' if best.n_draft > 1 else ''} per step, ~{best.tokens_per_s:.1f} tok/s "
            f"expected ({best.speedup:.2f}x)")


def prompt_text(p: Placement) -> str:
    """'~269 tok/s at ubatch 2048, a 20K-token prompt in ~74 s', or '' without an estimate."""
    if not p.est_ttft_s:
        return ""
    return (f"~{p.est_prompt_tokens_per_s:.0f} tok/s at ubatch {p.n_ubatch}, a {p.prompt_ref // 1000}K-token prompt "
            f"in ~{p.est_ttft_s:.0f} s")


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
        ("MTP", mtp_text(p)),
        ("est. prompt", prompt_text(p)),
    ]
    rows += [("note", note) for note in p.notes]
    for key, value in rows:
        if value:
            table.add_row(Text(key, style="dim"), value)
    return table


def minimum_lines(models: list[Minimum]) -> list[str]:
    """One line per model: its smallest quant known here, the RAM + VRAM that needs, and the smallest machine
    profiles that run it (with their memory and estimated speed)."""
    lines = []
    for m in models:
        runs = ", ".join(f"{p.name} ({gib(p.memory)}, ~{p.est_tokens_per_s:.0f} tok/s)" for p in m.profiles[:3])
        lines.append(f"{m.display} {m.quant}{' (published)' if m.published else ''}: {gib(m.file_bytes)} file, "
                     f"needs {gib(m.need_bytes)} of RAM + VRAM; runs on {runs or 'none of the machine profiles'}")
    return lines


def unsized_line(models: list[Minimum]) -> str | None:
    """Why the published quants not sized here do not change the answer (their bit class bounds them)."""
    bounds = [(m, m.unsized[0]) for m in models if m.unsized]
    if not bounds:
        return None
    parts = ", ".join(f"{m.display} {u.quant} at least {gib(u.at_least)}" for m, u in bounds)
    return f"published quants not sized here cannot fit either, by their bits per weight alone: {parts}"


def works_here(label: str, usable: int, fits: list[Minimum]) -> str:
    """What the (probed or planned) machine can do instead."""
    if fits:
        return "runs here: " + ", ".join(f"{m.display} {m.quant} (glmlocal plan {m.name})" for m in fits)
    if label == "this machine":
        return (f"what works here: `glmlocal rpc-server 0.0.0.0:50052` lends this machine's memory "
                f"({gib(usable)}) to a machine that runs a model (`--rpc THIS_HOST:50052` there); "
                "`glmlocal plan MODEL --machine NAME` (or --machines) plans for a machine you do not have")
    return "`glmlocal plan MODEL --machine NAME` (or --machines) plans one of the machine profiles"
