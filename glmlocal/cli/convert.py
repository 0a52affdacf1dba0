"""Rich rendering for long-running CLI commands (the library only emits progress events)."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def default_convert_output(src: Path, quant: str) -> Path:
    """`<parent>/<checkpoint dir name>-<QUANT>.gguf`, next to the checkpoint; for a Hugging Face cache
    snapshot (`models--org--name/snapshots/<commit>`), `./<name>-<QUANT>.gguf` in the current directory,
    never inside the cache."""
    from quantize.metadata import source_name

    name = source_name(src)
    src = Path(os.path.abspath(src))
    if name != src.name:
        return Path.cwd() / f"{name}-{quant.upper()}.gguf"
    return src.parent / f"{name}-{quant.upper()}.gguf"


def run_convert(src: Path, *, quant: str, out: Path | None, threads: int | None, no_mtp: bool,
                console: Console | None = None) -> Path:
    """`glmlocal convert`: one streamed conversion with a progress bar (MB/s, ETA)."""
    from quantize.convert import convert

    console = console or Console(stderr=True)
    out = Path(out) if out else default_convert_output(src, quant)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    bar = Progress(*columns, console=console, transient=True)  # a failed run leaves only its error line
    task = bar.add_task(quant.upper(), total=None)

    def on_progress(ev) -> None:
        if not bar.live.is_started:
            bar.start()  # only once data flows, so validation errors print without a bar
        bar.update(task, completed=ev.bytes_done, total=ev.bytes_total)

    try:
        result = convert(src, out, quant=quant, threads=threads, mtp=not no_mtp, progress=on_progress)
    finally:
        if bar.live.is_started:
            bar.stop()
    mix = ", ".join(f"{n} {k}" for k, n in sorted(result.type_counts.items()))
    console.print(f"wrote {result.path} ({result.bytes_written / 2**20:.1f} MiB, {result.n_tensors} tensors: "
                  f"{mix}) in {result.seconds:.1f}s")
    return result.path
