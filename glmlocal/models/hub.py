"""Talking to the Hugging Face Hub: listings, resumable verified downloads, and hub errors as one line.

huggingface_hub does the HTTP (its shared session, headers, URL building, typed errors, token lookup). The
byte transfer is our own ranged GET on that session because huggingface_hub 2.4.0 cannot resume across runs:
`_download_to_tmp_and_move` writes a uuid-named temp file opened "wb" and deletes it on failure
(huggingface_hub #4196, antirez/ds4 #1048), and its in-process retry only keeps bytes already flushed in
10 MB chunks. Here a partial file `<name>.<sha-prefix>.incomplete` survives, the next run sends
`Range: bytes=<size>-`, and the whole file is checked against the hub's size and sha256 (git blob sha1 for
small non-LFS files) before it is renamed to its final name. `HubClient.stream_range` is the one ranged GET:
downloads and the remote GGUF header reads (glmlocal.models.remote) share its retries, error mapping and checks.

The pull orchestration (which repo, preflight, conversion) lives in glmlocal.models.pull.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_token,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from glmlocal.errors import DiskSpaceError, GlmlocalError, HubError, RepoNotFoundError
from glmlocal.models.store import Store, free_bytes

READ_CHUNK = 1 << 20
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
DEFAULT_RETRIES = 3  # mid-file network failures survived per file within one run (linear backoff)
DEFAULT_RETRY_WAIT = 1.0
# Files fetched at once (split GGUF parts, safetensors shards): one HTTP stream rarely fills a fast line.
DEFAULT_WORKERS = 4


class TransientHTTPError(ConnectionError):
    """A status the hub returns under load: retried like a dropped connection."""


# ---------------------------------------------------------------------------------------------
# Events (rendered by the CLI; the library never prints)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileStarted:
    path: str
    size: int
    resume_from: int  # bytes already on disk from an earlier run


@dataclass(frozen=True)
class FileProgress:
    path: str
    file_done: int
    file_total: int
    done: int  # overall, for the current set of files
    total: int
    rate: float  # bytes/s, smoothed
    eta: float | None  # seconds for the overall set


@dataclass(frozen=True)
class FileDone:
    path: str
    size: int
    how: str  # "downloaded" | "resumed" | "present" | "hf-cache"


@dataclass(frozen=True)
class FileRetry:
    path: str
    reason: str


Callback = Callable[[object], None]


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    path: str  # path in the repository
    size: int
    sha256: str | None  # LFS files
    git_sha1: str | None  # every file: the git blob id

    @property
    def tag(self) -> str:
        return (self.sha256 or self.git_sha1 or "")[:12]


@dataclass(frozen=True)
class RepoListing:
    repo: str
    commit: str
    gated: bool
    files: list[RemoteFile]


def endpoint() -> str:
    """HF_ENDPOINT read at call time (huggingface_hub reads it once at import)."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE read at call time, with huggingface_hub's truthy values."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub would use (HF_HUB_CACHE, else HF_HOME/hub), read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


class HubClient:
    """One endpoint + token. `retries`: mid-file network failures one download survives; `workers`: files
    of a set fetched in parallel."""

    def __init__(self, endpoint_url: str | None = None, token: str | None = None, retries: int | None = None,
                 retry_wait: float | None = None, workers: int | None = None):
        self.endpoint = (endpoint_url or endpoint()).rstrip("/")
        self.token = token if token is not None else get_token()
        self.retries = DEFAULT_RETRIES if retries is None else retries
        self.retry_wait = DEFAULT_RETRY_WAIT if retry_wait is None else retry_wait
        self.workers = DEFAULT_WORKERS if workers is None else workers
        self.api = HfApi(endpoint=self.endpoint, token=self.token or False)

    def listing(self, repo: str, revision: str | None = None) -> RepoListing:
        """Commit sha and every file with size and hashes (one model_info call with blobs)."""
        if offline():
            raise HubError("HF_HUB_OFFLINE is set, cannot reach the hub", hint="unset HF_HUB_OFFLINE")
        try:
            info = self.api.model_info(repo, revision=revision, files_metadata=True)
        except Exception as e:  # mapped to one line; anything unexpected is re-raised as it is
            mapped = self.error(e, repo, revision=revision)
            if mapped is e:
                raise
            raise mapped from e
        files = [
            RemoteFile(s.rfilename, int(s.size or (s.lfs.size if s.lfs else 0)),
                       s.lfs.sha256 if s.lfs else None, s.blob_id)
            for s in info.siblings or []
        ]
        listing = RepoListing(repo, info.sha, bool(info.gated), files)
        if listing.gated and not self.token:  # fail before the preflight and the first byte, not mid-pull
            raise self._gated(repo)
        return listing

    # -- errors ------------------------------------------------------------------------------
    def _gated(self, repo: str) -> HubError:
        page = f"{self.endpoint}/{repo}"
        if not self.token:
            return HubError(f"{repo} is a gated repository and no Hugging Face token is set",
                            hint=f"accept its terms at {page}, then set HF_TOKEN or run `hf auth login`")
        return HubError(f"your Hugging Face token has no access to the gated repository {repo}",
                        hint=f"accept its terms at {page}")

    def error(self, e: Exception, repo: str, *, revision: str | None = None, path: str | None = None) -> Exception:
        """Map a huggingface_hub / network exception to a one-line HubError (or return it unchanged)."""
        if isinstance(e, hf_errors.GatedRepoError):
            return self._gated(repo)
        if isinstance(e, hf_errors.RevisionNotFoundError):
            return HubError(f"revision {revision!r} not found in {repo}", hint="check --revision")
        if isinstance(e, (hf_errors.RemoteEntryNotFoundError, hf_errors.EntryNotFoundError)):
            return HubError(f"{path or 'file'} not found in {repo} at {revision or 'main'}")
        if isinstance(e, hf_errors.RepositoryNotFoundError):
            extra = "" if self.token else "; if it is private, set HF_TOKEN"
            return RepoNotFoundError(f"repository {repo} not found on {self.endpoint}{extra}")
        if isinstance(e, hf_errors.HfHubHTTPError):
            status = e.response.status_code if e.response is not None else "?"
            if status == 401:
                return HubError("the hub rejected your Hugging Face token (401)", hint="check HF_TOKEN")
            return HubError(f"hub error {status} for {repo}{'/' + path if path else ''}")
        if isinstance(e, (httpx2.TransportError, ConnectionError)):
            return HubError(f"cannot reach {self.endpoint}: {e}", hint="check your network or HF_ENDPOINT")
        return e

    # -- download ----------------------------------------------------------------------------
    def download(self, repo: str, commit: str, rf: RemoteFile, dest: Path, *,
                 on_bytes: Callable[[int], None] | None = None,
                 on_event: Callback | None = None) -> str:
        """Fetch `rf` to `dest` (resuming a partial file), verify it, rename into place.

        Returns how the file got there: "downloaded", "resumed" or "hf-cache". A file whose hash does not
        match is deleted and fetched once more; a second mismatch raises HubError.
        """
        on_bytes = on_bytes or (lambda n: None)
        emit = on_event or (lambda ev: None)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = Store.incomplete_path(dest, rf.tag)
        _drop_stale_partials(dest, keep=part)
        if self._from_hf_cache(repo, commit, rf, dest, part):
            on_bytes(rf.size)
            return "hf-cache"
        how = "resumed" if part.exists() and part.stat().st_size > 0 else "downloaded"
        for attempt in range(2):
            digest = self._fetch(repo, commit, rf, part, on_bytes, emit)
            if digest_matches(rf, digest, part.stat().st_size):
                os.replace(part, dest)
                return how
            part.unlink(missing_ok=True)
            if attempt == 0:
                on_bytes(-rf.size)  # the progress goes back: the whole file is fetched again
                emit(FileRetry(rf.path, "checksum mismatch, fetching the file again"))
                how = "downloaded"
        raise HubError(f"{rf.path} from {repo} failed verification twice (sha256 mismatch)",
                       hint="the server or a proxy corrupts data; try again later")

    def _from_hf_cache(self, repo: str, commit: str, rf: RemoteFile, dest: Path, part: Path) -> bool:
        """Reuse a verified copy from the hub cache (e.g. fetched earlier by `hf download`): hardlink or copy."""
        try:
            cached = try_to_load_from_cache(repo, rf.path, cache_dir=str(hf_cache_dir()), revision=commit)
        except Exception:
            return False
        if not isinstance(cached, str) or not os.path.isfile(cached) or os.path.getsize(cached) != rf.size:
            return False
        if not digest_matches(rf, hash_file(cached, rf), rf.size):
            return False
        tmp = dest.with_name(dest.name + ".link" + ".incomplete")
        tmp.unlink(missing_ok=True)
        try:
            os.link(os.path.realpath(cached), tmp)
        except OSError:
            _copy_file(Path(cached), tmp)
        os.replace(tmp, dest)
        part.unlink(missing_ok=True)
        return True

    def _fetch(self, repo: str, commit: str, rf: RemoteFile, part: Path,
               on_bytes: Callable[[int], None], emit: Callback) -> dict:
        """Append the missing bytes of `rf` to `part`, surviving `self.retries` network failures."""
        if part.exists() and part.stat().st_size > rf.size:
            part.unlink()
        hashers = new_hashers(rf)
        if part.exists():
            _hash_existing(part, hashers)
        part.touch()
        kept = [part.stat().st_size]  # bytes in `part`: where to resume, what to take back if the file starts over

        def retry(n: int, at: int, e: Exception) -> None:
            emit(FileRetry(rf.path, f"connection lost at {at:,} bytes, resuming (retry {n}/{self.retries})"))

        with open(part, "ab") as fh:
            def take(chunk: bytes) -> None:
                _write(fh, chunk, part)
                for h in hashers.values():
                    h.update(chunk)
                kept[0] += len(chunk)
                on_bytes(len(chunk))

            def restart() -> None:  # the server ignored Range: the whole file follows
                fh.truncate(0)  # flushes what is buffered first; appends then start at byte 0
                on_bytes(-kept[0])
                kept[0] = 0
                hashers.update(new_hashers(rf))

            try:
                self.stream_range(repo, commit, rf, kept[0], on_chunk=take, on_restart=restart, on_retry=retry)
            except TransferFailed as e:
                raise HubError(f"network failure while downloading {rf.path} ({e.reached:,} of {rf.size:,} bytes "
                               f"kept): {e.cause}", hint="run the same command again to resume") from e
        return {k: h.hexdigest() for k, h in hashers.items()}

    # -- ranged GET --------------------------------------------------------------------------
    def stream_range(self, repo: str, commit: str, rf: RemoteFile, start: int = 0, end: int | None = None, *,
                     on_chunk: Callable[[bytes], None], on_restart: Callable[[], None] | None = None,
                     on_retry: Callable[[int, int, Exception], None] | None = None) -> None:
        """Hand bytes [start, end) of `rf` (end None: to the end of the file) to `on_chunk` as they arrive.

        A dropped connection, a body that ends early and a status the hub answers under load (RETRY_STATUS) are
        retried `self.retries` times with linear backoff, each retry asking only for the bytes not yet handed over
        (`on_retry(n, offset reached, error)` is told first); then TransferFailed. A server that answers a
        byte range with the whole file (HTTP 200): `on_restart()` is called and the file follows from byte 0, or,
        without `on_restart`, RangeIgnored. Hub errors become one-line HubErrors (see `error`); whatever
        `on_chunk` raises propagates.
        """
        at = [start]  # offset of the next byte to hand over, kept across attempts
        for failures in range(self.retries + 1):
            try:
                self._stream_once(repo, commit, rf, at, end, on_chunk, on_restart)
                return
            except (httpx2.TransportError, ConnectionError) as e:
                if failures == self.retries:
                    raise TransferFailed(self.endpoint, repo, rf.path, at[0], e) from e
                if on_retry is not None:
                    on_retry(failures + 1, at[0], e)
                time.sleep(self.retry_wait * (failures + 1))

    def _stream_once(self, repo: str, commit: str, rf: RemoteFile, at: list[int], end: int | None,
                     on_chunk: Callable[[bytes], None], on_restart: Callable[[], None] | None) -> None:
        """One GET of [at[0], end) on the resolve URL (redirects followed), advancing at[0] per chunk handed over."""
        stop = rf.size if end is None else end
        if at[0] >= stop:
            return
        url = hf_hub_url(repo, rf.path, revision=commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token or False)
        ranged = at[0] > 0 or end is not None
        if ranged:
            headers["Range"] = f"bytes={at[0]}-" + ("" if end is None else str(end - 1))
        try:
            # Not http_stream_backoff: its retry wrapper cannot resume once the body has started streaming.
            with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as resp:
                if resp.status_code in RETRY_STATUS:
                    raise TransientHTTPError(f"HTTP {resp.status_code} from the hub")
                hf_raise_for_status(resp)
                if ranged and resp.status_code == 200:
                    if on_restart is None:  # the body is the whole file (maybe tens of GB): do not read it
                        raise RangeIgnored(self.endpoint, repo, rf.path)
                    on_restart()
                    at[0] = 0
                elif resp.status_code == 206:
                    _check_content_range(resp.headers.get("Content-Range"), at[0], repo, rf.path)
                # iter_bytes() without a chunk size hands over what arrived, so a drop loses nothing
                for chunk in resp.iter_bytes():
                    if end is not None:
                        chunk = chunk[:end - at[0]]
                    on_chunk(chunk)
                    at[0] += len(chunk)
                    if end is not None and at[0] >= end:
                        break
        except (httpx2.TransportError, ConnectionError, GlmlocalError):
            raise
        except Exception as e:
            mapped = self.error(e, repo, revision=commit, path=rf.path)
            if mapped is e:
                raise
            raise mapped from e
        if at[0] < stop:
            raise ConnectionError(f"the connection closed at byte {at[0]:,} of {stop:,}")


class TransferFailed(HubError):
    """A ranged GET still failing after the client's retries. `reached`: offset of the first byte not received."""

    def __init__(self, endpoint_url: str, repo: str, path: str, reached: int, cause: Exception):
        super().__init__(f"network failure while reading {repo}/{path} from {endpoint_url}: {cause}",
                         hint="check your network or HF_ENDPOINT, then run it again")
        self.reached, self.cause = reached, cause


class RangeIgnored(HubError):
    """The server answered a byte-range request with the whole file."""

    def __init__(self, endpoint_url: str, repo: str, path: str):
        super().__init__(f"{endpoint_url} ignored a byte-range request for {repo}/{path} (HTTP 200)",
                         hint="use a hub or mirror that serves byte ranges")
        self.repo, self.path = repo, path


def _check_content_range(value: str | None, start: int, repo: str, path: str) -> None:
    """A 206 must start where we asked: anything else would put bytes at the wrong offset."""
    if value is None:
        return
    try:
        first = int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        first = -1
    if first != start:
        raise HubError(f"the hub answered a byte-range request for {repo}/{path} with {value!r}")


def _write(fh, chunk: bytes, part: Path) -> None:
    try:
        fh.write(chunk)
    except OSError as e:
        if e.errno == 28:  # ENOSPC: keep the partial file so the pull resumes once space is freed
            raise DiskSpaceError(str(part.parent), len(chunk), free_bytes(part.parent), what="download") from e
        raise


def _drop_stale_partials(dest: Path, keep: Path) -> None:
    """Partial files for another revision of this file can never be resumed: remove them."""
    for p in dest.parent.glob(dest.name + ".*.incomplete"):
        if p != keep:
            p.unlink(missing_ok=True)


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as a, open(dst, "wb") as b:
        while chunk := a.read(READ_CHUNK * 8):
            b.write(chunk)


def _hash_existing(part: Path, hashers: dict) -> None:
    with open(part, "rb") as fh:
        while chunk := fh.read(READ_CHUNK * 8):
            for h in hashers.values():
                h.update(chunk)


# ---------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------
def new_hashers(rf: RemoteFile) -> dict:
    """sha256 for LFS files; the git blob sha1 ("blob <size>\\0" + bytes) for small non-LFS files."""
    if rf.sha256:
        return {"sha256": hashlib.sha256()}
    h = hashlib.sha1(b"blob %d\0" % rf.size)
    return {"sha256": hashlib.sha256(), "git_sha1": h}


def hash_file(path: str | Path, rf: RemoteFile) -> dict:
    hashers = new_hashers(rf)
    _hash_existing(Path(path), hashers)
    return {k: h.hexdigest() for k, h in hashers.items()}


def digest_matches(rf: RemoteFile, digest: dict, size: int) -> bool:
    if size != rf.size:
        return False
    if rf.sha256:
        return digest.get("sha256") == rf.sha256
    if rf.git_sha1:
        return digest.get("git_sha1") == rf.git_sha1
    return True  # the hub gave no hash: size is all we can check


class RateMeter:
    """Transfer rate over a sliding window of the last few seconds, and the ETA it implies."""

    WINDOW_S = 3.0

    def __init__(self, total: int, done: int = 0):
        self.total = total
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), done)])

    def update(self, done: int) -> tuple[float, float | None]:
        now = time.monotonic()
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.WINDOW_S:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        rate = max(0, done - d0) / (now - t0) if now > t0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else None
        return rate, eta
