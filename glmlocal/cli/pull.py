"""Rich rendering for `glmlocal pull`, `list` and `rm` (presentation only; the work is in pull.py / store.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from glmlocal.models import hub
from glmlocal.models import pull as pull_mod
from glmlocal.models.store import Store, dir_size

GIB = 1024**3


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class PullView:
    """Turns pull events into two Rich bars (overall + current file) with MB/s and ETA from the events."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), console=console, transient=True,
        )
        self.overall: TaskID | None = None
        self.files: dict[str, TaskID] = {}  # one bar per file in flight (several download at once)
        self.convert: TaskID | None = None

    def __enter__(self) -> PullView:
        return self  # bars start with the first download, so an early error prints only its one line

    def __exit__(self, *exc) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def __call__(self, ev: object) -> None:
        handler = _HANDLERS.get(type(ev))
        if handler is None:  # a new or renamed event must get a handler, not vanish from the screen
            raise TypeError(f"PullView has no handler for {type(ev).__module__}.{type(ev).__qualname__}")
        handler(self, ev)

    def _pull_started(self, ev: pull_mod.PullStarted) -> None:
        what = "GGUF" if ev.method == "gguf" else "source checkpoint"
        self.console.print(f"[bold]{ev.name} {ev.quant}[/]: {what} {ev.repo}@{ev.revision[:12]}, {ev.files} "
                           f"file(s), {human(ev.total)}" + (f" ({human(ev.present)} already here)" if ev.present else ""))
        if not self.progress.live.is_started:
            self.progress.start()
        self.overall = self.progress.add_task("total", total=ev.total, completed=ev.present, speed="")

    def _file_started(self, ev: hub.FileStarted) -> None:
        label = Path(ev.path).name + (f" (resuming at {human(ev.resume_from)})" if ev.resume_from else "")
        self.files[ev.path] = self.progress.add_task(label, total=ev.size, completed=ev.resume_from, speed="")

    def _file_progress(self, ev: hub.FileProgress) -> None:
        speed = f"{ev.rate / 1e6:.1f} MB/s ETA {_eta(ev.eta)}"
        if ev.path in self.files:
            self.progress.update(self.files[ev.path], completed=ev.file_done)
        if self.overall is not None:
            self.progress.update(self.overall, completed=ev.done, speed=speed)

    def _file_retry(self, ev: hub.FileRetry) -> None:
        self.console.print(f"[yellow]{ev.path}: {ev.reason}[/]")

    def _file_done(self, ev: hub.FileDone) -> None:
        task = self.files.pop(ev.path, None)
        if task is not None:
            self.progress.remove_task(task)
        note = {"present": "already here, verified", "hf-cache": "from the Hugging Face cache, verified"}
        self.console.print(f"  {ev.path}: {human(ev.size)} {note.get(ev.how, ev.how + ', verified')}")

    def _convert_started(self, ev: pull_mod.ConvertStarted) -> None:
        self.console.print(f"converting {ev.dtype} checkpoint -> {ev.out.name}")
        self.convert = self.progress.add_task("convert", total=None, speed="")

    def _convert_progress(self, ev: pull_mod.ConvertEvent) -> None:
        p = ev.event
        if self.convert is not None:
            speed = f"{p.mb_per_s:.1f} MB/s ETA {_eta(p.eta_s)}"
            self.progress.update(self.convert, completed=p.bytes_done, total=p.bytes_total, speed=speed)

    def _source_deleted(self, ev: pull_mod.SourceDeleted) -> None:
        self.console.print(f"deleted the source checkpoint ({human(ev.freed)}); keep it with --keep-source")

    def _pull_done(self, ev: pull_mod.PullDone) -> None:
        rate = ev.downloaded / ev.seconds / 1e6 if ev.seconds > 0 else 0.0
        self.console.print(f"[green]done[/]: {ev.path} (fetched {human(ev.downloaded)} in {ev.seconds:.1f} s, "
                           f"{rate:.1f} MB/s)")


# Every event pull() emits, and what shows it. An event missing here is a TypeError at the first emit.
_HANDLERS: dict[type, Callable[[PullView, Any], None]] = {
    pull_mod.PullStarted: PullView._pull_started,
    hub.FileStarted: PullView._file_started,
    hub.FileProgress: PullView._file_progress,
    hub.FileRetry: PullView._file_retry,
    hub.FileDone: PullView._file_done,
    pull_mod.ConvertStarted: PullView._convert_started,
    pull_mod.ConvertEvent: PullView._convert_progress,
    pull_mod.SourceDeleted: PullView._source_deleted,
    pull_mod.PullDone: PullView._pull_done,
}


def run_pull(model: str, quant: str, *, from_source: bool, revision: str | None, keep_source: bool,
             source: str | None) -> None:
    console = Console(stderr=True)
    with PullView(console) as view:
        pull_mod.pull(model, quant, from_source=from_source, revision=revision, keep_source=keep_source,
                      source=source, progress=view)


def run_list() -> None:
    """Print every manifest in the store as a table (half-finished pulls with the command that resumes them)."""
    store = Store()
    manifests = store.manifests()
    console = Console()
    if not console.is_terminal:  # piped or captured: one line per model, never folded
        console = Console(width=10_000)
    if not manifests:
        console.print(f"no models in {store.models_root} (run: glmlocal pull MODEL --quant Q)")
        return
    table = Table("model", "quant", "size", "state", "path")
    for m in manifests:
        table.add_row(m.name, m.quant, *_row(store, m))
    console.print(table)


def _row(store: Store, m) -> tuple[str, str, str]:
    """(size, state, path) of one manifest."""
    if m.state == "complete":
        state = "complete, verified" if m.verified else "complete, not verified"
        return human(m.total_bytes), state, str(store.gguf_path(m) or store.model_dir(m.name, m.quant))
    progress_of = m
    if m.method == "convert" and m.state == "downloading" and m.source:  # bytes arrive in the source's dir
        progress_of = store.read_manifest(m.name, f"source-{m.source['dtype']}") or m
    d = store.model_dir(progress_of.name, progress_of.quant)
    on_disk = dir_size(d) - _size(d / "manifest.json") - _size(d / ".lock")
    total = progress_of.total_bytes
    pct = f" {100 * on_disk / total:.0f}%" if total and m.state == "downloading" else ""
    size = f"{human(on_disk)} of {human(total)}" if total else human(on_disk)
    return size, f"{m.state}{pct} ({_resume_hint(m)})", str(store.model_dir(m.name, m.quant))


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def _resume_hint(m) -> str:
    """The command that continues this half-finished pull."""
    if m.method == "source":
        return "source checkpoint for a conversion; resume with the same pull command"
    cmd = f"resume: glmlocal pull {m.name} --quant {m.quant}"
    if m.method == "convert":
        src = m.source or {}
        cmd += f" --from-source --source {src.get('dtype', 'bf16')}" + (" --keep-source" if src.get("kept") else "")
    if m.requested_revision:
        cmd += f" --revision {m.requested_revision}"
    return cmd


def run_rm(model: str, quant: str | None) -> None:
    """Remove a pulled model (one quant, or everything incl. kept sources). Says how much was freed."""
    from glmlocal.errors import InputError
    from glmlocal.models.registry import find_model, normalize_quant

    store = Store()
    spec = find_model(model)
    name = spec.name if spec is not None else model.lower()
    q = quant.lower() if quant else None
    if q is not None and not q.startswith("source-"):
        q = normalize_quant(q)
    target = store.model_dir(name, q) if q else store.model_root(name)
    if not target.exists():
        label = f"{name} {q}" if q else name
        raise InputError(f"{label} is not in the store ({store.models_root})", hint="see glmlocal list")
    freed = store.remove(name, q)
    Console().print(f"removed {name}{' ' + q if q else ''}: freed {human(freed)}")
