"""A local stand-in for the Hugging Face Hub, speaking the part of its HTTP API huggingface_hub uses.

Point HF_ENDPOINT at `FakeHub.url`. Served:
  GET  /api/models/{repo}[/revision/{rev}]          model info (sha, siblings with size + lfs sha256 when ?blobs)
  GET  /api/models/{repo}/tree/{rev}[/{path}]       tree listing (oid, size, lfs {oid, size, pointerSize})
  POST /api/models/{repo}/paths-info/{rev}          same entries for the posted `paths`
  HEAD/GET /{repo}/resolve/{rev}/{path}             file bytes, Range requests, ETag / X-Repo-Commit /
                                                    X-Linked-Etag / X-Linked-Size headers
  GET  /cdn/{sha256}/{repo}/{path}                  with `redirect_lfs`: LFS bytes after the hub's 302, like
                                                    the real hub's CDN (Range honoured, no auth needed)
Switches: `ranges = False` makes every GET answer 200 with the whole body (a server that ignores Range);
`redirect_lfs = True` answers LFS GETs on /resolve/ with a 302 to /cdn/..., as huggingface.co does.
Errors carry X-Error-Code like the real hub (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), so
huggingface_hub raises its own typed errors. Fault injection (`Fault`) drops a connection after N bytes,
corrupts a byte, or answers a status code; `bytes_sent` counts body bytes served per (repo, path) so tests can
prove a resume did not download anything twice.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from gguf import GGUF_DEFAULT_ALIGNMENT, GGUFValueType

from quantize.gguf_reader import SCALAR_DTYPES

CHUNK = 256 * 1024
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class Blob:
    data: bytes | None
    path: Path | None
    size: int
    sha256: str
    git_sha1: str

    @classmethod
    def of(cls, content: bytes | Path) -> Blob:
        if isinstance(content, (str, Path)):
            p = Path(content)
            h, size = hashlib.sha256(), p.stat().st_size
            g = hashlib.sha1(b"blob %d\0" % size)
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    g.update(chunk)
            return cls(None, p, size, h.hexdigest(), g.hexdigest())
        data = bytes(content)
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return cls(data, None, len(data), hashlib.sha256(data).hexdigest(), git)

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        with open(self.path, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)


@dataclass
class Fault:
    """Applied to GET /resolve requests whose file path matches `path` (a glob), `times` times.

    kind "drop": send bytes up to absolute file offset `at`, then cut the connection.
    kind "short": answer normally but end the body (and Content-Length) at absolute file offset `at`.
    kind "corrupt": flip the byte at absolute file offset `at`.
    kind "status": answer `status` with no body.
    kind "badrange": a 206 whose Content-Range starts one byte after the asked offset.
    """

    path: str = "*"
    kind: str = "drop"
    at: int = 0
    times: int = 1
    status: int = 500


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private: bool = False


class FakeHub:
    """Threaded HTTP server on 127.0.0.1 (random port). Use as a context manager or call start()/stop()."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.allowed_tokens: set[str] = {"hf_good_token"}
        self.stream_bps: float | None = None  # per-connection rate cap, like a CDN's per-stream limit
        self.ranges = True  # False: ignore Range headers (answer 200 with the whole file)
        self.redirect_lfs = False  # True: LFS downloads go through a 302 to /cdn/..., like the real hub
        self.bytes_sent: dict[tuple[str, str], int] = {}
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- setup -------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], *, ref: str = "main",
                 gated: bool = False, private: bool = False) -> str:
        """Add a commit holding `files` to `repo_id` and point `ref` at it. Returns the commit sha."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        repo.gated, repo.private = gated, private
        blobs = {name: Blob.of(content) for name, content in files.items()}
        h = hashlib.sha1(repo_id.encode() + str(len(repo.commits)).encode())
        for name in sorted(blobs):
            h.update(name.encode() + blobs[name].sha256.encode())
        sha = h.hexdigest()
        repo.commits[sha] = blobs
        repo.refs[ref] = sha
        return sha

    def add_dir(self, repo_id: str, directory: Path, *, prefix: str = "", **kw) -> str:
        """Serve every (non-hidden) file under `directory` as a commit of `repo_id`."""
        directory = Path(directory)
        files = {prefix + p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
                 if p.is_file() and not p.name.startswith(".")}
        return self.add_repo(repo_id, files, **kw)

    def served(self, repo_id: str, path: str) -> int:
        return self.bytes_sent.get((repo_id, path), 0)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- used by the handler -----------------------------------------------------------------
    def take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and fnmatch.fnmatch(path, f.path):
                    f.times -= 1
                    return f
        return None

    def count(self, repo_id: str, path: str, n: int) -> None:
        with self._lock:
            key = (repo_id, path)
            self.bytes_sent[key] = self.bytes_sent.get(key, 0) + n


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-body (it read the bytes it wanted) is normal, not worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class HubHTTPError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _entry(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "path": path, "size": blob.size, "oid": blob.git_sha1}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
    return entry


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _error(self, e: HubHTTPError) -> None:
        headers = {"X-Error-Message": e.message, "Content-Type": "application/json"}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._send(e.status, json.dumps({"error": e.message}).encode(), headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _repo(self, repo_id: str, *, download: bool) -> Repo:
        repo = self.fake.repos.get(repo_id)
        token = self._token()
        if repo is None:
            raise HubHTTPError(404, "RepoNotFound", "Repository not found")
        if repo.private and token not in self.fake.allowed_tokens:
            raise HubHTTPError(401, "RepoNotFound", "Repository not found")
        if repo.gated and download and token not in self.fake.allowed_tokens:
            status = 401 if token is None else 403
            raise HubHTTPError(status, "GatedRepo", f"Access to model {repo_id} is restricted")
        return repo

    @staticmethod
    def _commit(repo: Repo, rev: str) -> str:
        rev = unquote(rev)
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.commits:
            return rev
        raise HubHTTPError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _log(self, **kw) -> None:
        with self.fake._lock:
            self.fake.requests.append({"method": self.command, "path": self.path, **kw})

    # -- routing -----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        self._log(range=self.headers.get("Range"), auth=self._token())
        try:
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api("/".join(parts[2:4]), parts[4:], parse_qs(url.query))
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve("/".join(parts[:2]), parts[3], unquote("/".join(parts[4:])))
            elif parts[0] == "cdn" and len(parts) >= 5:
                self._cdn(parts[1], "/".join(parts[2:4]), unquote("/".join(parts[4:])))
            else:
                raise HubHTTPError(404, None, f"no route for {url.path}")
        except HubHTTPError as e:
            self._error(e)

    def _api(self, repo_id: str, rest: list[str], query: dict) -> None:
        repo = self._repo(repo_id, download=False)
        if not rest or rest[0] == "revision":
            sha = self._commit(repo, rest[1] if len(rest) > 1 else "main")
            self._json(self._info(repo, sha, blobs="blobs" in query))
        elif rest[0] == "tree" and len(rest) >= 2:
            sha = self._commit(repo, rest[1])
            prefix = unquote("/".join(rest[2:]))
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            self._json(self._tree(repo.commits[sha], prefix, recursive))
        elif rest[0] == "paths-info" and len(rest) >= 2:
            sha = self._commit(repo, rest[1])
            length = int(self.headers.get("Content-Length", 0))
            form = parse_qs(self.rfile.read(length).decode())
            files = repo.commits[sha]
            self._json([_entry(p, files[p]) for p in form.get("paths", []) if p in files])
        else:
            raise HubHTTPError(404, None, "unknown api route")

    @staticmethod
    def _info(repo: Repo, sha: str, blobs: bool) -> dict:
        siblings = []
        for name, blob in sorted(repo.commits[sha].items()):
            sib = {"rfilename": name}
            if blobs:
                e = _entry(name, blob)
                sib.update(size=blob.size, blobId=blob.git_sha1)
                if "lfs" in e:
                    sib["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": 134}
            siblings.append(sib)
        return {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "siblings": siblings,
                "tags": [], "downloads": 0, "likes": 0}

    @staticmethod
    def _tree(files: dict[str, Blob], prefix: str, recursive: bool) -> list[dict]:
        out, folders = [], set()
        base = prefix.rstrip("/") + "/" if prefix else ""
        for name in sorted(files):
            if not name.startswith(base):
                continue
            rel = name[len(base):]
            if "/" in rel and not recursive:
                folders.add(base + rel.split("/")[0])
                continue
            out.append(_entry(name, files[name]))
        out += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        if prefix and not out:
            raise HubHTTPError(404, "EntryNotFound", f"{prefix} does not exist")
        return out

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id, download=True)
        sha = self._commit(repo, rev)
        blob = repo.commits[sha].get(path)
        if blob is None:
            raise HubHTTPError(404, "EntryNotFound", f"{path} does not exist at {rev}")
        lfs = path.endswith(LFS_SUFFIXES)
        etag = blob.sha256 if lfs else blob.git_sha1
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": blob.size})
        if lfs and self.fake.redirect_lfs and self.command == "GET":
            self._send(302, b"", {**headers, "Location": f"/cdn/{blob.sha256}/{repo_id}/{path}"})
            return
        self._serve(repo_id, path, blob, headers)

    def _cdn(self, sha256: str, repo_id: str, path: str) -> None:
        """The CDN behind the 302: serves a blob by its sha256 (signed URLs need no token)."""
        repo = self.fake.repos.get(repo_id)
        blobs = [b for c in (repo.commits.values() if repo else ()) for p, b in c.items() if p == path]
        blob = next((b for b in blobs if b.sha256 == sha256), None)
        if blob is None:
            raise HubHTTPError(404, None, "no such blob")
        self._serve(repo_id, path, blob, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes",
                                          "Content-Type": "application/octet-stream"})

    def _serve(self, repo_id: str, path: str, blob: Blob, headers: dict) -> None:
        start, end, status = self._range(blob.size)
        fault = self.fake.take_fault(path) if self.command == "GET" else None
        if status == 206:
            first = start + (fault is not None and fault.kind == "badrange")
            headers["Content-Range"] = f"bytes {first}-{end - 1}/{blob.size}"
        if fault is not None and fault.kind == "status":
            raise HubHTTPError(fault.status, None, "injected failure")
        if fault is not None and fault.kind == "short":  # a complete response, just fewer bytes than asked
            end = max(start, min(end, fault.at))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "GET":
            self._stream(repo_id, path, blob, start, end, fault)

    def _range(self, size: int) -> tuple[int, int, int]:
        header = self.headers.get("Range")
        if not header or not header.startswith("bytes=") or not self.fake.ranges:
            return 0, size, 200
        first, _, last = header[6:].partition("-")
        start = int(first) if first else 0
        end = min(int(last) + 1, size) if last else size
        if start >= size:
            raise HubHTTPError(416, None, "range not satisfiable")
        return start, end, 206

    def _stream(self, repo_id: str, path: str, blob: Blob, start: int, end: int, fault: Fault | None) -> None:
        pos = start
        stop = end
        if fault is not None and fault.kind == "drop":
            stop = max(start, min(end, fault.at))
        while pos < stop:
            data = bytearray(blob.read(pos, min(pos + CHUNK, stop)))
            if fault is not None and fault.kind == "corrupt" and pos <= fault.at < pos + len(data):
                data[fault.at - pos] ^= 0xFF
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client read what it wanted and hung up
                self.close_connection = True
                return
            self.fake.count(repo_id, path, len(data))
            pos += len(data)
            if self.fake.stream_bps:
                time.sleep(len(data) / self.fake.stream_bps)
        if stop < end:  # injected drop: cut the connection mid-body
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------------
# Splitting a GGUF the way llama.cpp's gguf-split does (tools/gguf-split/gguf-split.cpp)
# ---------------------------------------------------------------------------------------------
_FIXED = {int(vt): dt.itemsize for vt, dt in SCALAR_DTYPES.items()}  # bytes of each fixed-size value type
_U16, _I32, _STR, _ARR = GGUFValueType.UINT16, GGUFValueType.INT32, GGUFValueType.STRING, GGUFValueType.ARRAY
ALIGN = GGUF_DEFAULT_ALIGNMENT  # gguf-split pads every split with it


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _FIXED:
        return pos + _FIXED[vtype]
    if vtype == _STR:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == _ARR:
        itype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _FIXED:
            return pos + n * _FIXED[itype]
        for _ in range(n):
            pos = _skip_value(buf, pos, itype)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def _kv(key: str, vtype: int, fmt: str, value) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + struct.pack(fmt, value)


def split_gguf(src: Path, out_dir: Path, stem: str, n_split: int) -> list[Path]:
    """Write `src` as `n_split` files `<stem>-0000k-of-0000N.gguf` exactly like `llama-gguf-split --split`.

    Split 0 carries every original key plus split.no / split.count / split.tensors.count; the others carry only
    the three split keys. Tensors are dealt out in order, each split's data padded to 32 bytes.
    """
    from quantize.gguf_reader import read_gguf

    g = read_gguf(src)
    assert g.alignment == ALIGN, "gguf-split always writes the default alignment"
    raw = Path(src).read_bytes()
    pos = 24
    for _ in range(len(g.metadata)):
        (klen,) = struct.unpack_from("<Q", raw, pos)
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", raw, pos)
        pos = _skip_value(raw, pos + 4, vtype)
    kv_bytes = raw[24:pos]
    per = -(-len(g.tensors) // n_split)
    groups = [g.tensors[i * per:(i + 1) * per] for i in range(n_split)]
    assert all(groups), "more splits than tensors"
    paths = []
    for i, tensors in enumerate(groups):
        split_kv = (_kv("split.no", _U16, "<H", i) + _kv("split.count", _U16, "<H", n_split)
                    + _kv("split.tensors.count", _I32, "<i", len(g.tensors)))
        n_kv = (len(g.metadata) + 3) if i == 0 else 3
        head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), n_kv))
        head += (kv_bytes if i == 0 else b"") + split_kv
        offset, data = 0, bytearray()
        for t in tensors:
            name = t.name.encode()
            head += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.shape))
            head += struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.ggml_type, offset)
            chunk = raw[g.data_offset + t.offset:g.data_offset + t.offset + t.nbytes]
            data += chunk + bytes(-len(chunk) % ALIGN)
            offset += len(chunk) + (-len(chunk) % ALIGN)
        head += bytes(-len(head) % ALIGN)
        path = Path(out_dir) / f"{stem}-{i + 1:05d}-of-{n_split:05d}.gguf"
        path.write_bytes(bytes(head) + bytes(data))
        paths.append(path)
    return paths
