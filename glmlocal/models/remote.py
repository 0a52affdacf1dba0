"""Sizing a published GGUF before downloading it: its headers, read with HTTP Range requests and cached.

Quants our converter cannot write (unsloth's UD-Q2_K_XL, IQ*, Q3_K_M...) cannot be sized from the recipe, but
every GGUF file starts with a header that lists each tensor's shape and type: the first split also holds the
metadata (tokenizer included, ~10 MB for GLM), the others only their own tensor infos (tens of KB). We read
those prefixes in growing chunks until the header parses, through the hub endpoint, token and revision
handling of glmlocal.models.hub, and keep them in the store:

    headers/<repo>/<commit>/<path in the repo>     the header bytes, as a sparse file of the real size
    headers/<repo>/sets/<key>.json                 which commit and files a (revision, pattern) resolved to

A cache file holds the original header followed by a hole up to the original size (no disk blocks), so the
existing header reader and `footprint_from_gguf` read it exactly as they read the downloaded file: the plan
from remote headers equals the plan from the pulled files. The JSON is written last, so a cached set is
complete; a second plan reads only the cache (no network, HF_HUB_OFFLINE is fine).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from glmlocal.errors import GlmlocalError, HubError, InputError, PlanError
from glmlocal.models.hub import (
    HubClient,
    RangeIgnored,
    RemoteFile,
    TransferFailed,
    offline,
)
from glmlocal.models.store import Store, atomic_write_text
from glmlocal.plan.footprint import Footprint, footprint_from_gguf, footprint_from_spec

FIRST_READ = 256 << 10  # bytes of the first request per file (a split's tensor infos fit); doubled until it parses
MAX_HEADER = 64 << 20  # GLM's first split header is ~10 MB (tokenizer); past this the file is not a sane GGUF
SPARSE_SLACK = 16 << 20  # allocated bytes tolerated beyond the header before we call a filesystem non-sparse


@dataclass(frozen=True)
class RemoteHeaders:
    """Where a published quant's headers came from and where their local copies are."""

    repo: str
    revision: str | None  # as requested (None: the default branch)
    commit: str
    files: tuple[tuple[str, int], ...]  # (path in the repo, size) of every split, in order
    first: Path  # local copy of the first split's header (what footprint_from_gguf reads)
    cached: bool  # True: read from the store without touching the network
    fetched_bytes: int  # bytes transferred over HTTP by this call (0 when cached)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "commit": self.commit, "cached": self.cached,
                "fetched_bytes": self.fetched_bytes, "files": [{"path": p, "size": s} for p, s in self.files]}


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def published_footprint(spec, quant: str, *, revision: str | None = None, store: Store | None = None,
                        client: HubClient | None = None) -> tuple[Footprint, RemoteHeaders]:
    """Footprint of `spec`'s published `quant` GGUF from its headers (cached, else fetched with Range requests).

    Raises InputError (no such published quant, unreadable header), HubError (offline without cache, hub
    errors, a hub that ignores Range requests).
    """
    from glmlocal.models.registry import check_quant

    quant = check_quant(spec, quant)
    published = spec.published_gguf(quant)
    if published is None:
        raise InputError(f"{spec.name} has no published {quant} GGUF to read headers from")
    headers = fetch_headers(published.repo, published.pattern, revision=revision, store=store, client=client,
                            what=f"{spec.name} {quant}")
    try:
        fp = footprint_from_gguf(headers.first)
    except InputError as e:
        _drop_set(store or Store(), published.repo, revision, published.pattern)
        raise InputError(f"the published {quant} GGUF of {spec.name} ({published.repo}) has an unusable header: "
                         f"{_strip_root(e.message, store)}") from e
    return replace(fp, quant=quant), headers


def fetch_headers(repo: str, pattern: str, *, revision: str | None = None, store: Store | None = None,
                  client: HubClient | None = None, what: str | None = None) -> RemoteHeaders:
    """Local copies of the headers of every file `pattern` matches in `repo` (cached after the first call)."""
    store = store or Store()
    cached = _cached_set(store, repo, revision, pattern)
    if cached is not None:
        return cached
    if offline():
        raise HubError(f"HF_HUB_OFFLINE is set and the GGUF headers of {what or repo} are not cached",
                       hint="run the same command once online: it reads only the file headers, a few MB")
    from glmlocal.models.pull import select_gguf

    client = client or HubClient()
    listing = client.listing(repo, revision)
    files = select_gguf(listing, pattern)
    fetched = 0
    for rf in files:
        header, transferred = read_remote_header(client, repo, listing.commit, rf)
        fetched += transferred
        _write_sparse(_header_path(store, repo, listing.commit, rf.path), header, rf.size)
    doc = {"repo": repo, "revision": revision, "pattern": pattern, "commit": listing.commit,
           "files": [{"path": rf.path, "size": rf.size} for rf in files]}
    index = _set_path(store, repo, revision, pattern)
    index.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(index, json.dumps(doc, indent=2))
    return _headers_from(store, doc, cached=False, fetched=fetched)


def read_remote_header(client: HubClient, repo: str, commit: str, rf: RemoteFile) -> tuple[bytes, int]:
    """(header of one remote GGUF up to its data section, bytes transferred), fetched in doubling Range requests."""
    buf = bytearray()
    want = min(FIRST_READ, rf.size)
    while True:
        buf += _get_range(client, repo, commit, rf, len(buf), want)
        n = header_length(bytes(buf), f"{repo}/{rf.path}")
        if n is not None:
            return bytes(buf[:n]), len(buf)
        if want >= rf.size or want >= MAX_HEADER:
            raise InputError(f"{repo}/{rf.path}: no complete GGUF header in its first {want:,} bytes "
                             f"(of {rf.size:,}): the file is corrupt or not a GGUF")
        want = min(want * 2, rf.size, MAX_HEADER)


def header_length(buf: bytes, label: str) -> int | None:
    """Length of the GGUF header (metadata + tensor infos + alignment padding) at the start of `buf`.

    None when `buf` ends inside the header (fetch more); GGUFFormatError when the bytes are not a GGUF header.
    """
    from quantize.gguf_reader import GGUFTruncated, read_header

    try:
        return read_header(buf, label=label).data_offset
    except GGUFTruncated:
        return None


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
def _get_range(client: HubClient, repo: str, commit: str, rf: RemoteFile, start: int, end: int) -> bytes:
    """Bytes [start, end) of `rf`, through the hub client's one ranged GET (its retries and checks)."""
    data = bytearray()
    try:
        client.stream_range(repo, commit, rf, start, end, on_chunk=data.extend)
    except TransferFailed as e:
        raise HubError(f"network failure while reading the GGUF header of {repo}/{rf.path} from {client.endpoint}: "
                       f"{e.cause}", hint="check your network or HF_ENDPOINT, then run it again") from e
    except RangeIgnored as e:  # a 200 would be the whole file (tens of GB): it was not read
        raise HubError(f"{client.endpoint} ignored a byte-range request for {repo}/{rf.path} (HTTP 200), so its "
                       f"header cannot be read without the whole file",
                       hint="pull the model first, then plan it; or use a hub/mirror that serves ranges") from e
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------
def cache_root(store: Store | None = None) -> Path:
    return (store or Store()).root / "headers"


def _repo_dir(store: Store, repo: str) -> Path:
    parts = repo.split("/")
    if not all(p and p not in (".", "..") for p in parts):
        raise InputError(f"invalid repository name {repo!r}")
    return cache_root(store).joinpath(*parts)


def _header_path(store: Store, repo: str, commit: str, path: str) -> Path:
    parts = path.split("/")
    if not all(p and p not in (".", "..") for p in parts) or not commit.isalnum():
        raise InputError(f"invalid file {path!r} at {commit!r} in {repo}")
    return _repo_dir(store, repo).joinpath(commit, *parts)


def _set_path(store: Store, repo: str, revision: str | None, pattern: str) -> Path:
    key = hashlib.sha1(f"{revision or ''}\0{pattern}".encode()).hexdigest()[:16]
    return _repo_dir(store, repo) / "sets" / f"{key}.json"


def _cached_set(store: Store, repo: str, revision: str | None, pattern: str) -> RemoteHeaders | None:
    index = _set_path(store, repo, revision, pattern)
    try:
        doc = json.loads(index.read_text())
        headers = _headers_from(store, doc, cached=True, fetched=0)
    except (OSError, ValueError, KeyError, TypeError, InputError):
        return None
    for path, size in headers.files:
        local = _header_path(store, repo, headers.commit, path)
        if not local.is_file() or local.stat().st_size != size:
            return None
    return headers


def _headers_from(store: Store, doc: dict, *, cached: bool, fetched: int) -> RemoteHeaders:
    files = tuple((f["path"], int(f["size"])) for f in doc["files"])
    first = _header_path(store, doc["repo"], doc["commit"], files[0][0])
    return RemoteHeaders(doc["repo"], doc.get("revision"), doc["commit"], files, first, cached, fetched)


def _drop_set(store: Store, repo: str, revision: str | None, pattern: str) -> None:
    """Forget a set whose header turned out unusable, so the next plan fetches it again."""
    index = _set_path(store, repo, revision, pattern)
    try:
        commit = json.loads(index.read_text())["commit"]
        shutil.rmtree(_repo_dir(store, repo) / commit, ignore_errors=True)
    except (OSError, ValueError, KeyError):
        pass
    index.unlink(missing_ok=True)


def _write_sparse(path: Path, header: bytes, size: int) -> None:
    """`header` then a hole up to `size` bytes: the original file's layout, without its tensor data on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    with open(tmp, "wb") as fh:
        fh.write(header)
        fh.truncate(size)
    if os.stat(tmp).st_blocks * 512 > len(header) + SPARSE_SLACK:  # the filesystem filled the hole with zeros
        tmp.unlink()
        raise InputError(f"cannot cache GGUF headers under {path.parent}: the filesystem does not support sparse "
                         f"files", hint="set GLMLOCAL_HOME to a directory on ext4, xfs, btrfs, zfs, apfs or tmpfs")
    os.replace(tmp, path)


def _strip_root(message: str, store: Store | None) -> str:
    root = str(cache_root(store)) + os.sep
    return message.replace(root, "")


# ---------------------------------------------------------------------------------------------
# Smaller quants for the planner's no-fit hint
# ---------------------------------------------------------------------------------------------
class SmallerQuants(Mapping):
    """quant -> Footprint of the quants smaller than the planned one, best (largest) that could fit first.

    Lazy: nothing is listed or fetched unless the planner iterates it (only when nothing fits), and it stops
    at the first one that fits, so at most the headers it needs are fetched. Converted quants are sized from
    the recipe; published-only ones from their headers (cached, else fetched), ordered by the hub's file sizes.
    Published quants that could not be sized (offline without cache, hub errors) are kept in `unsized` so the
    error can say so instead of claiming nothing smaller exists.
    """

    def __init__(self, spec, current_bytes: int, limit_bytes: int | None = None, *, revision: str | None = None,
                 store: Store | None = None, client_factory: Callable[[], HubClient] | None = None):
        self.spec, self.current_bytes, self.limit_bytes = spec, current_bytes, limit_bytes
        self.revision, self.store = revision, store or Store()
        self.client_factory = client_factory or HubClient
        self.loaded: dict[str, Footprint] = {}
        self.sizes: dict[str, int] = {}
        self.published: set[str] = set()
        self.unsized: dict[str, str] = {}  # quant -> why it could not be sized
        self._order: list[str] | None = None

    def __iter__(self) -> Iterator[str]:
        for quant in self._candidates():
            if quant in self.loaded or self._load(quant):
                yield quant

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return True  # `alternatives or {}` must not size every candidate (Mapping's truth test is len())

    def __getitem__(self, quant: str) -> Footprint:
        if quant not in self.loaded and not self._load(quant):
            raise KeyError(quant)
        return self.loaded[quant]

    # -- sizing ----------------------------------------------------------------------------
    def _candidates(self) -> list[str]:
        if self._order is None:
            from glmlocal.models.registry import QUANTS

            for q in QUANTS:
                fp = footprint_from_spec(self.spec, q)
                self.loaded[q], self.sizes[q] = fp, fp.file_bytes
            self._size_published()
            limit = None if self.limit_bytes is None else self.limit_bytes * 1.05  # MTP/header slack
            fits = [q for q, n in self.sizes.items() if n < self.current_bytes and (limit is None or n <= limit)]
            self._order = sorted(fits, key=lambda q: -self.sizes[q])
        return self._order

    def _size_published(self) -> None:
        """File sizes of the published-only quants: from cached header sets, else one hub listing per repo."""
        from glmlocal.models.pull import select_gguf

        listings: dict[str, object] = {}  # repo -> RepoListing, or the error message listing it gave
        for q in self.spec.published_only():
            self.published.add(q)
            g = self.spec.gguf[q]
            cached = _cached_set(self.store, g.repo, self.revision, g.pattern)
            if cached is not None:
                self.sizes[q] = cached.total_bytes
                continue
            if g.repo not in listings:
                listings[g.repo] = self._listing(g.repo)
            listing = listings[g.repo]
            if isinstance(listing, str):
                self.unsized[q] = listing
                continue
            try:
                self.sizes[q] = sum(f.size for f in select_gguf(listing, g.pattern))
            except GlmlocalError as e:
                self.unsized[q] = e.message

    def _listing(self, repo: str):
        if offline():
            return "HF_HUB_OFFLINE is set and its headers are not cached"
        try:
            return self.client_factory().listing(repo, self.revision)
        except GlmlocalError as e:
            return e.message

    def _load(self, quant: str) -> bool:
        try:
            fp, _ = published_footprint(self.spec, quant, revision=self.revision, store=self.store,
                                        client=self.client_factory())
        except GlmlocalError as e:
            self.unsized[quant] = e.message
            return False
        self.loaded[quant] = fp
        return True

    # -- the error -------------------------------------------------------------------------
    def explain(self, err: PlanError) -> PlanError:
        """Make the planner's no-fit hint say how to get a published quant, or which ones were not sized."""
        hint = err.hint or ""
        named = next((q for q in self.published if f"--quant {q} " in hint + " "), None)
        if named is not None:
            size = self.sizes.get(named, 0)
            size_text = f"{size / 1e9:.0f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
            err.hint = (f"--quant {named} fits: a published GGUF of {size_text}; "
                        f"run: glmlocal pull {self.spec.name} --quant {named}")
        elif "--quant" not in hint and "--ctx" not in hint and self.unsized and self._order is not None:
            names = [q for q in self.spec.published_only() if q in self.unsized]
            err.hint = (f"no converted or already-sized quant fits; the published GGUFs {', '.join(names)} could "
                        f"not be sized (offline, or the hub is unreachable): size one with "
                        f"`glmlocal plan {self.spec.name} --quant QUANT` when online")
        return err
