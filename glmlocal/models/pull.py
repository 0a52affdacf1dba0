"""`glmlocal pull`: get a registry model at a quant, from a published GGUF or by converting safetensors.

Path A (a published GGUF for that quant, split files included): download, verify, done.
Path B (no published GGUF, or --from-source): download the safetensors (FP8 when it is smaller and the quant
is lossy enough not to care), run quantize.convert, delete the source unless keep_source.
Both paths check free disk for everything still to come before the first byte, keep a manifest that says how
far they got (a rerun resumes), and report progress as events from glmlocal.models.hub plus the ones below.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from glmlocal.errors import ConversionError, HubError, InputError, RepoNotFoundError
from glmlocal.models import registry, scheme
from glmlocal.models.hub import (
    Callback,
    FileDone,
    FileProgress,
    FileStarted,
    HubClient,
    RateMeter,
    RemoteFile,
    RepoListing,
    digest_matches,
    hash_file,
    offline,
)
from glmlocal.models.store import (
    SPLIT_RE,
    FileEntry,
    Manifest,
    Store,
    check_free,
    source_quant,
)

if TYPE_CHECKING:  # the converter (numpy, ggml) is imported only when a pull converts
    from quantize.convert import ConvertProgress

# README.md: the model card's front matter gives general.license / tags / languages, as in llama.cpp's converter.
SOURCE_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.tiktoken", "*.model", "README.md",
                   "additional_chat_templates/*.jinja")
# Bits per weight of the converter's output, a little above the real mix so the preflight errs safe.
BPW = {"bf16": 16.0, "q8_0": 8.5, "q6_k": 6.6, "q4_k_m": 5.5}
SOURCE_BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.0}
PROGRESS_EVERY_S = 0.1


# ---------------------------------------------------------------------------------------------
# Events (besides hub.FileStarted / FileProgress / FileDone / FileRetry)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PullStarted:
    name: str
    quant: str
    method: str  # "gguf" | "source" (downloading safetensors for a conversion)
    repo: str
    revision: str
    files: int
    total: int  # bytes of the whole set
    present: int  # bytes already on disk (complete or partial files)


@dataclass(frozen=True)
class ConvertStarted:
    src: Path
    out: Path
    dtype: str


@dataclass(frozen=True)
class ConvertEvent:
    event: ConvertProgress  # the converter's progress, passed through


@dataclass(frozen=True)
class SourceDeleted:
    path: Path
    freed: int


@dataclass(frozen=True)
class PullDone:
    manifest: Manifest
    path: Path
    downloaded: int  # bytes fetched by this run
    seconds: float


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def pull(model: str, quant: str, *, from_source: bool = False, revision: str | None = None,
         keep_source: bool = False, source: str | None = None, store: Store | None = None,
         client: HubClient | None = None, progress: Callback | None = None, threads: int | None = None) -> Manifest:
    """Pull `model` (registry name or alias) at `quant`. Returns the complete manifest.

    Raises InputError (unknown model / quant / source), HubError (gated, missing, network, corrupt) or
    DiskSpaceError (with the numbers) before anything is written under a final name.
    """
    spec = registry.get_model(model)
    quant = registry.check_quant(spec, quant, from_source=from_source or source is not None)  # before any network
    store = store or Store()
    emit = progress or (lambda ev: None)
    if offline():
        m = store.read_manifest(spec.name, quant)
        if m is not None and m.state == "complete":
            return m  # nothing to fetch: offline mode is fine
        raise HubError("HF_HUB_OFFLINE is set, cannot download", hint="unset HF_HUB_OFFLINE")
    published = None if (from_source or source) else spec.published_gguf(quant)  # --source implies --from-source
    if published is not None:
        client = client or HubClient()
        return _pull_gguf(spec, quant, published, revision, store, client, emit)
    if not spec.sources:
        raise InputError(f"{spec.name} has no published {quant} GGUF and no source checkpoint")
    client = client or HubClient()
    return _pull_convert(spec, quant, revision, keep_source, source, store, client, emit, threads)


# ---------------------------------------------------------------------------------------------
# Path A: published GGUF
# ---------------------------------------------------------------------------------------------
def select_gguf(listing: RepoListing, pattern: str) -> list[RemoteFile]:
    """Files matching the registry glob; a split set must be complete (every -0000k-of-0000N part)."""
    files = sorted((f for f in listing.files if fnmatch.fnmatch(f.path, pattern)), key=lambda f: f.path)
    if not files:
        raise HubError(f"no file matching {pattern!r} in {listing.repo} at {listing.commit[:12]}",
                       hint="the repository layout changed (models.toml's pattern is out of date); "
                            "for q4_k_m/q6_k/q8_0/bf16 --from-source converts instead")
    names = [PurePosixPath(f.path).name for f in files]
    splits = [SPLIT_RE.match(n) for n in names]
    if all(splits):
        counts = {int(m["count"]) for m in splits}
        nos = sorted(int(m["no"]) for m in splits)
        if len(counts) != 1 or nos != list(range(1, counts.pop() + 1)):
            raise HubError(f"published GGUF in {listing.repo} is incomplete or mixed: {', '.join(names)}")
    elif len(files) > 1:
        raise HubError(f"pattern {pattern!r} matches several GGUF models in {listing.repo}: {', '.join(names)}")
    if len(set(names)) != len(names):
        raise HubError(f"pattern {pattern!r} matches files with the same name in {listing.repo}")
    return files


def _pull_gguf(spec, quant: str, published, revision: str | None, store: Store, client: HubClient,
               emit: Callback) -> Manifest:
    t0 = time.monotonic()
    listing = client.listing(published.repo, revision)
    files = select_gguf(listing, published.pattern)
    dest = store.model_dir(spec.name, quant)
    with store.lock(spec.name, quant):
        m = _manifest_for(store, spec.name, quant, "gguf", listing, revision, files)
        m.gguf = m.files[0].path
        _preflight(store, dest, files, m, extra=0, what=f"{spec.name} {quant}")
        store.write_manifest(m)
        downloaded = download_set(client, listing, files, dest, m, store, emit)
        m.state, m.verified = "complete", True
        store.write_manifest(m)
    emit(PullDone(m, store.gguf_path(m), downloaded, time.monotonic() - t0))
    return m


def _manifest_for(store: Store, name: str, quant: str, method: str, listing: RepoListing,
                  revision: str | None, files: list[RemoteFile], prefix: str = "") -> Manifest:
    """A fresh manifest for this listing, keeping the verified flag of files whose hashes did not change."""
    old = store.read_manifest(name, quant)
    previous = {f.path: f for f in old.files} if old is not None else {}
    entries = []
    for rf in files:
        local = PurePosixPath(rf.path).name if method == "gguf" else prefix + rf.path
        prev = previous.get(local)
        same = prev is not None and prev.size == rf.size and (prev.sha256, prev.git_sha1) == (rf.sha256, rf.git_sha1)
        entries.append(FileEntry(local, rf.size, rf.sha256, rf.git_sha1, verified=bool(same and prev.verified)))
    m = Manifest(name=name, quant=quant, method=method, repo=listing.repo, revision=listing.commit,
                 requested_revision=revision, files=entries)
    if old is not None:
        m.created_at = old.created_at
    return m


# ---------------------------------------------------------------------------------------------
# Downloading a set of files with one progress stream
# ---------------------------------------------------------------------------------------------
def _on_disk(dest: Path, entry: FileEntry, rf: RemoteFile) -> int:
    """Bytes of this file already here: all of it if verified, else the partial download."""
    final = dest / entry.path
    if final.exists() and final.stat().st_size == rf.size and entry.verified:
        return rf.size
    part = Store.incomplete_path(final, rf.tag)
    return min(part.stat().st_size, rf.size) if part.exists() else 0


def _preflight(store: Store, dest: Path, files: list[RemoteFile], m: Manifest, extra: int, what: str) -> None:
    remaining = sum(rf.size - _on_disk(dest, e, rf) for rf, e in zip(files, m.files))
    check_free(dest, remaining + extra, what)


def download_set(client: HubClient, listing: RepoListing, files: list[RemoteFile], dest: Path,
                 m: Manifest, store: Store, emit: Callback) -> int:
    """Fetch every file of `m` into `dest` (client.workers files at a time), one progress stream.

    Returns the bytes fetched by this run. The manifest is rewritten after each file, so an interrupted pull
    knows what is done; on the first failure the other transfers stop and keep their partial files.
    """
    return _SetDownload(client, listing, files, dest, m, store, emit).run()


class Cancelled(Exception):
    """Another file of the set failed, or the user interrupted: stop this transfer, keep its partial file."""


class _SetDownload:
    def __init__(self, client: HubClient, listing: RepoListing, files: list[RemoteFile], dest: Path,
                 m: Manifest, store: Store, emit: Callback):
        self.client, self.listing, self.files, self.dest, self.m, self.store = client, listing, files, dest, m, store
        self._emit = emit
        self.lock = threading.RLock()  # events, counters and manifest writes come from worker threads
        self.stop = threading.Event()
        self.total = sum(rf.size for rf in files)
        self.done = self.fetched = 0
        self.last = 0.0
        self.meter = RateMeter(self.total)

    def emit(self, ev: object) -> None:
        with self.lock:
            self._emit(ev)

    def run(self) -> int:
        m = self.m
        self.done = sum(_on_disk(self.dest, e, rf) for rf, e in zip(self.files, m.files))
        self.meter = RateMeter(self.total, self.done)
        self.emit(PullStarted(m.name, m.quant, m.method, self.listing.repo, self.listing.commit, len(self.files),
                              self.total, self.done))
        todo = []
        for rf, entry in zip(self.files, m.files):
            if _already_verified(self.dest / entry.path, entry, rf):
                self.emit(FileDone(entry.path, rf.size, "present"))
            else:
                todo.append((rf, entry))
        self.store.write_manifest(m)
        workers = max(1, min(self.client.workers, len(todo)))
        if workers == 1:
            for rf, entry in todo:
                self.one(rf, entry)
            return self.fetched
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="glmlocal-pull") as pool:
            futures = [pool.submit(self.one, rf, entry) for rf, entry in todo]
            try:
                for fut in as_completed(futures):
                    fut.result()  # the first failure (or Ctrl-C) wins
            finally:
                self.stop.set()  # the others stop at their next chunk
        return self.fetched

    def one(self, rf: RemoteFile, entry: FileEntry) -> None:
        if self.stop.is_set():
            raise Cancelled(rf.path)
        resume_from = _on_disk(self.dest, entry, rf)
        self.emit(FileStarted(entry.path, rf.size, resume_from))
        file_done = [resume_from]

        def on_bytes(n: int) -> None:
            if self.stop.is_set():
                raise Cancelled(rf.path)
            with self.lock:
                file_done[0] += n
                self.done += n
                self.fetched += max(n, 0)
                now = time.monotonic()
                if now - self.last >= PROGRESS_EVERY_S or file_done[0] >= rf.size:
                    self.last = now
                    rate, eta = self.meter.update(self.done)
                    self.emit(FileProgress(entry.path, file_done[0], rf.size, self.done, self.total, rate, eta))

        how = self.client.download(self.listing.repo, self.listing.commit, rf, self.dest / entry.path,
                                   on_bytes=on_bytes, on_event=self.emit)
        with self.lock:
            entry.verified = True
            self.store.write_manifest(self.m)
            self.emit(FileDone(entry.path, rf.size, how))


def _already_verified(final: Path, entry: FileEntry, rf: RemoteFile) -> bool:
    """A final-named file is trusted if the manifest says verified; otherwise it is hashed once."""
    if not final.exists():
        return False
    if final.stat().st_size == rf.size and (entry.verified or digest_matches(rf, hash_file(final, rf), rf.size)):
        entry.verified = True
        return True
    final.unlink()  # a stale or foreign file under the final name: fetch it again
    entry.verified = False
    return False


# ---------------------------------------------------------------------------------------------
# Path B: safetensors -> converter
# ---------------------------------------------------------------------------------------------
def select_source(listing: RepoListing) -> list[RemoteFile]:
    """Top-level weights, config, tokenizer files and model card of a checkpoint repository (plus any
    additional_chat_templates/, which the converter exports as named templates)."""
    files = [f for f in listing.files if any(fnmatch.fnmatch(f.path, p) and p.count("/") == f.path.count("/")
                                             for p in SOURCE_PATTERNS)]
    if not any(f.path.endswith(".safetensors") for f in files):
        raise HubError(f"{listing.repo} has no safetensors files at {listing.commit[:12]}")
    if not any(f.path == "config.json" for f in files):
        raise HubError(f"{listing.repo} has no config.json at {listing.commit[:12]}")
    return sorted(files, key=lambda f: f.path)


def choose_source(spec: registry.ModelSpec, quant: str, listings: dict[str, RepoListing], requested: str | None) -> str:
    """Which checkpoint to convert from.

    An explicit --source wins. BF16 output or Q8_0 comes from BF16 (re-quantizing FP8 values would lose
    precision the original has). For Q6_K / Q4_K_M the FP8 checkpoint is about half the download and its
    rounding error is small next to the quantization's, so the smaller one is used (unless its config.json
    declares an FP8 scheme the converter does not read: _pull_convert then takes the BF16 one, see scheme.py).
    """
    if requested is not None:
        if requested not in spec.sources:
            raise InputError(f"{spec.name} has no {requested} source", hint=f"choose: {', '.join(spec.sources)}")
        return requested
    if len(spec.sources) == 1:
        return next(iter(spec.sources))
    if quant in ("bf16", "q8_0") and "bf16" in spec.sources:
        return "bf16"
    sizes = {d: sum(f.size for f in select_source(lst)) for d, lst in listings.items()}
    return min(sizes, key=lambda d: (sizes[d], d != spec.prefer_source))


def estimate_output(files: list[RemoteFile], dtype: str, quant: str) -> int:
    """Upper-ish estimate of the GGUF size: parameters from the safetensors bytes, times bits per weight."""
    weights = sum(f.size for f in files if f.path.endswith(".safetensors"))
    params = weights / SOURCE_BYTES_PER_PARAM.get(dtype, 2.0)
    return int(params * BPW[quant] / 8 * 1.02) + (16 << 20)


def _pull_convert(spec, quant: str, revision: str | None, keep_source: bool, requested: str | None,
                  store: Store, client: HubClient, emit: Callback, threads: int | None) -> Manifest:
    t0 = time.monotonic()
    dtype, listing = _source_listing(spec, quant, revision, requested, client)
    files = select_source(listing)
    out_dir, src_dir = store.model_dir(spec.name, quant), store.source_dir(spec.name, dtype)
    out_name = f"{spec.display}-{quant.upper()}.gguf"
    repo_dir = listing.repo.split("/")[-1]
    config = scheme.source_config(client, listing, files, src_dir / repo_dir) if dtype == "fp8" else None
    if config is not None:
        try:
            scheme.check_scheme(config, listing)  # the converter's reading, before any weight is downloaded
        except ConversionError:
            if requested is None and "bf16" in spec.sources:
                return _pull_convert(spec, quant, revision, keep_source, "bf16", store, client, emit, threads)
            raise
    with store.lock(spec.name, quant), store.lock(spec.name, source_quant(dtype)):
        done = _already_converted(store, spec.name, quant, listing)
        if done is not None:
            emit(PullDone(done, store.gguf_path(done), 0, time.monotonic() - t0))
            return done
        # general.name / basename / version come from the checkpoint folder's name (as in llama.cpp's
        # convert_hf_to_gguf): the files sit in a folder named like the repository, and the name is passed on.
        sm = _manifest_for(store, spec.name, source_quant(dtype), "source", listing, revision, files, repo_dir + "/")
        m = Manifest(spec.name, quant, "convert", listing.repo, listing.commit, revision,
                     source={"repo": listing.repo, "revision": listing.commit, "dtype": dtype, "kept": keep_source})
        _preflight(store, src_dir, files, sm, estimate_output(files, dtype, quant), f"{spec.name} {quant}")
        store.write_manifest(m)
        store.write_manifest(sm)
        if config is not None:
            scheme.put_config(src_dir / repo_dir, config)
        downloaded = download_set(client, listing, files, src_dir, sm, store, emit)
        sm.state, sm.verified = "complete", True
        store.write_manifest(sm)
        m.state = "converting"
        store.write_manifest(m)
        out = _convert(src_dir / repo_dir, out_dir / out_name, quant, dtype, emit, threads, repo_dir)
        m.files = [FileEntry(out_name, out.stat().st_size, None, None, verified=True)]
        m.gguf, m.state, m.verified = out_name, "complete", True
        store.write_manifest(m)
    if not keep_source:
        emit(SourceDeleted(src_dir, store.remove(spec.name, source_quant(dtype))))
    emit(PullDone(m, out, downloaded, time.monotonic() - t0))
    return m


def _already_converted(store: Store, name: str, quant: str, listing: RepoListing) -> Manifest | None:
    m = store.read_manifest(name, quant)
    if m is None or m.state != "complete" or m.method != "convert" or (m.source or {}).get("revision") != listing.commit:
        return None
    path = store.gguf_path(m)
    return m if path is not None and path.is_file() and path.stat().st_size == m.files[0].size else None


def _source_listing(spec, quant: str, revision: str | None, requested: str | None,
                    client: HubClient) -> tuple[str, RepoListing]:
    if requested is not None or len(spec.sources) == 1 or quant in ("bf16", "q8_0"):
        dtype = choose_source(spec, quant, {}, requested)
        return dtype, client.listing(spec.sources[dtype], revision)
    # --revision names a commit or branch of one repository; with two candidate repos it applies to both.
    # A mirror (HF_ENDPOINT) may carry only one of them: use what exists.
    listings, missing = {}, []
    for d, repo in spec.sources.items():
        try:
            listings[d] = client.listing(repo, revision)
        except RepoNotFoundError as e:
            missing.append(e)
    if not listings:
        raise missing[0]
    dtype = choose_source(spec, quant, listings, None)
    return dtype, listings[dtype]


def _convert(src_dir: Path, out: Path, quant: str, dtype: str, emit: Callback, threads: int | None,
             name: str) -> Path:
    from quantize.convert import convert

    emit(ConvertStarted(src_dir, out, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(src_dir, out, quant=quant, threads=threads, progress=lambda ev: emit(ConvertEvent(ev)),
            source_name=name)
    if not out.is_file():
        raise HubError(f"the converter finished but {out} is missing")
    return out
