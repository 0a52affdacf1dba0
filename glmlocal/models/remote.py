"""A published GGUF's headers before downloading it: read with HTTP Range requests, cached in the store.

Quants our converter cannot write (unsloth's UD-Q2_K_XL, IQ*, Q3_K_M...) cannot be sized from the recipe, but
every GGUF file starts with a header that lists each tensor's shape and type: the first split also holds the
metadata (tokenizer included, ~10 MB for GLM), the others only their own tensor infos (tens of KB). We read
those prefixes in growing chunks until the header parses, through the hub client's ranged GET (its endpoint,
token, revision, retries), and keep them in the store:

    headers/<repo>/<commit>/<path in the repo>     the header bytes (up to the data section), nothing more
    headers/<repo>/sets/<key>.json                 which commit and files (sizes, header lengths) a
                                                   (revision, pattern) resolved to

The headers come back parsed (quantize's read_header, given each file's real size), so a plan from them equals
the plan from the pulled files (glmlocal.plan.published builds it). The JSON is written last, so a cached set is
complete; a second plan reads only the cache (no network, HF_HUB_OFFLINE is fine). A set in an older cache
format is simply fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from glmlocal.errors import HubError, InputError
from glmlocal.models.hub import (
    HubClient,
    RangeIgnored,
    RemoteFile,
    TransferFailed,
    offline,
)
from glmlocal.models.pull import select_gguf
from glmlocal.models.store import Store, atomic_write_text
from quantize.gguf_reader import GGUFHeader, GGUFTruncated, read_header

FIRST_READ = 256 << 10  # bytes of the first request per file (a split's tensor infos fit); doubled until it parses
MAX_HEADER = 64 << 20  # GLM's first split header is ~10 MB (tokenizer); past this the file is not a sane GGUF
CACHE_FORMAT = 2  # 2: plain header files; 1 (no "format" key) kept sparse files of the original size


@dataclass(frozen=True)
class RemoteHeaders:
    """A published GGUF's parsed headers (one per split, in order) and where they came from."""

    repo: str
    revision: str | None  # as requested (None: the default branch)
    commit: str
    files: tuple[tuple[str, int], ...]  # (path in the repo, size) of every split, in order
    headers: tuple[GGUFHeader, ...]  # parsed header of each split (metadata, tensor infos, header length)
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
def fetch_headers(repo: str, pattern: str, *, revision: str | None = None, store: Store | None = None,
                  client: HubClient | None = None, what: str | None = None) -> RemoteHeaders:
    """The parsed headers of every file `pattern` matches in `repo` (cached after the first call).

    Raises HubError (offline without cache, hub errors, a hub that ignores Range requests) and GGUFFormatError
    (an InputError: a file whose start is not a GGUF header).
    """
    store = store or Store()
    cached = _cached_set(store, repo, revision, pattern)
    if cached is not None:
        return cached
    if offline():
        raise HubError(f"HF_HUB_OFFLINE is set and the GGUF headers of {what or repo} are not cached",
                       hint="run the same command once online: it reads only the file headers, a few MB")
    client = client or HubClient()
    listing = client.listing(repo, revision)
    files = select_gguf(listing, pattern)
    fetched, headers, entries = 0, [], []
    for rf in files:
        header, raw, transferred = read_remote_header(client, repo, listing.commit, rf)
        fetched += transferred
        _write_header(_header_path(store, repo, listing.commit, rf.path), raw)
        headers.append(header)
        entries.append({"path": rf.path, "size": rf.size, "header": len(raw)})
    doc = {"format": CACHE_FORMAT, "repo": repo, "revision": revision, "pattern": pattern, "commit": listing.commit,
           "files": entries}
    index = _set_path(store, repo, revision, pattern)
    index.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(index, json.dumps(doc, indent=2))
    return _headers_from(doc, tuple(headers), cached=False, fetched=fetched)


def cached_total_bytes(repo: str, pattern: str, *, revision: str | None = None,
                       store: Store | None = None) -> int | None:
    """Bytes of the files a cached set lists (None: not cached), without parsing its headers."""
    store = store or Store()
    doc = _read_set(store, repo, revision, pattern)
    return None if doc is None else sum(f["size"] for f in doc["files"])


def drop_headers(repo: str, pattern: str, *, revision: str | None = None, store: Store | None = None) -> None:
    """Forget a cached set (e.g. one whose header turned out unusable), so the next call fetches it again."""
    store = store or Store()
    index = _set_path(store, repo, revision, pattern)
    try:
        commit = json.loads(index.read_text())["commit"]
        shutil.rmtree(_repo_dir(store, repo) / commit, ignore_errors=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    index.unlink(missing_ok=True)


def read_remote_header(client: HubClient, repo: str, commit: str, rf: RemoteFile) -> tuple[GGUFHeader, bytes, int]:
    """(parsed header of one remote GGUF, its bytes up to the data section, bytes transferred), fetched in doubling
    Range requests."""
    buf = bytearray()
    want = min(FIRST_READ, rf.size)
    label = f"{repo}/{rf.path}"
    while True:
        buf += _get_range(client, repo, commit, rf, len(buf), want)
        try:
            header = read_header(bytes(buf), label=label, size=rf.size)
        except GGUFTruncated:
            if want >= rf.size or want >= MAX_HEADER:
                raise InputError(f"{label}: no complete GGUF header in its first {want:,} bytes (of {rf.size:,}): "
                                 f"the file is corrupt or not a GGUF") from None
            want = min(want * 2, rf.size, MAX_HEADER)
            continue
        return header, bytes(buf[:header.data_offset]), len(buf)


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


def _read_set(store: Store, repo: str, revision: str | None, pattern: str) -> dict | None:
    """The set's JSON if it is in the current format and every header file it lists has the recorded length."""
    try:
        doc = json.loads(_set_path(store, repo, revision, pattern).read_text())
        if doc.get("format") != CACHE_FORMAT or doc.get("repo") != repo or not doc["files"]:
            return None
        for f in doc["files"]:
            if _header_path(store, repo, doc["commit"], f["path"]).stat().st_size != f["header"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, InputError):
        return None
    return doc


def _cached_set(store: Store, repo: str, revision: str | None, pattern: str) -> RemoteHeaders | None:
    doc = _read_set(store, repo, revision, pattern)
    if doc is None:
        return None
    try:
        headers = tuple(read_header(_header_path(store, repo, doc["commit"], f["path"]).read_bytes(),
                                    label=f"{repo}/{f['path']}", size=int(f["size"])) for f in doc["files"])
    except (OSError, InputError):  # damaged since it was written: fetch it again
        return None
    return _headers_from(doc, headers, cached=True, fetched=0)


def _headers_from(doc: dict, headers: tuple[GGUFHeader, ...], *, cached: bool, fetched: int) -> RemoteHeaders:
    files = tuple((f["path"], int(f["size"])) for f in doc["files"])
    return RemoteHeaders(doc["repo"], doc.get("revision"), doc["commit"], files, headers, cached, fetched)


def _write_header(path: Path, header: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    tmp.write_bytes(header)
    os.replace(tmp, path)
