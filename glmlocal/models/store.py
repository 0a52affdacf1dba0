"""The on-disk model store: layout, manifests, free space, and resolving what a user typed to a model.

This is the only module that builds store paths. Layout under $GLMLOCAL_HOME (default ~/.cache/glmlocal):

    models/<name>/<quant>/manifest.json      one manifest per model + quant (written atomically)
    models/<name>/<quant>/<file>.gguf        the GGUF file(s); `<file>.incomplete` while downloading
    models/<name>/source-<dtype>/...         safetensors downloaded for a local conversion (deleted after
                                             conversion unless --keep-source)
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from glmlocal.errors import DiskSpaceError, InputError

STATES = ("downloading", "converting", "complete")
MANIFEST = "manifest.json"
INCOMPLETE = ".incomplete"
SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def home() -> Path:
    """Root of the store: $GLMLOCAL_HOME, else ~/.cache/glmlocal (read at call time so tests can set it)."""
    env = os.environ.get("GLMLOCAL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "glmlocal"


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------
@dataclass
class FileEntry:
    """One file of a pulled model. `path` is relative to the model+quant directory (or the source dir)."""

    path: str
    size: int
    sha256: str | None = None  # LFS files: the hub's sha256; converted outputs: computed locally
    git_sha1: str | None = None  # small non-LFS files: the hub only gives the git blob id
    verified: bool = False


@dataclass
class Manifest:
    """What was pulled, from where, and how far it got. `state` is one of STATES."""

    name: str
    quant: str
    method: Literal["gguf", "convert", "source"]  # "source": safetensors kept for conversion
    repo: str
    revision: str  # the commit sha everything was fetched at
    requested_revision: str | None = None
    state: str = "downloading"
    verified: bool = False
    files: list[FileEntry] = field(default_factory=list)
    gguf: str | None = None  # first (or only) GGUF file, relative to the model dir
    source: dict | None = None  # convert path: {"repo", "revision", "dtype", "kept"}
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["files"] = [FileEntry(**f) for f in data.get("files", [])]
        return cls(**data)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------
def _safe_component(text: str) -> str:
    """Names come from the registry, but never let one escape the store."""
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise InputError(f"invalid model or quant name {text!r}")
    return text


class Store:
    """Paths and manifests under one root. Every method is cheap; nothing is cached in memory."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else home()

    @property
    def models_root(self) -> Path:
        return self.root / "models"

    def model_root(self, name: str) -> Path:
        return self.models_root / _safe_component(name)

    def model_dir(self, name: str, quant: str) -> Path:
        return self.model_root(name) / _safe_component(quant.lower())

    def source_dir(self, name: str, dtype: str) -> Path:
        """Where safetensors for a local conversion go (dtype "bf16" or "fp8").

        A source is stored like a quant named `source-<dtype>` (with its own manifest), so resume, verify,
        list and rm treat it exactly like a GGUF pull.
        """
        return self.model_dir(name, source_quant(dtype))

    def manifest_path(self, name: str, quant: str) -> Path:
        return self.model_dir(name, quant) / MANIFEST

    @staticmethod
    def incomplete_path(final: Path, tag: str = "") -> Path:
        """Partial downloads live next to their final name, so a resume finds them and a rename is atomic.

        `tag` (a prefix of the expected sha256) keeps bytes of another revision of the file from being resumed.
        """
        return final.with_name(f"{final.name}.{tag}{INCOMPLETE}" if tag else final.name + INCOMPLETE)

    def read_manifest(self, name: str, quant: str) -> Manifest | None:
        path = self.manifest_path(name, quant)
        try:
            return Manifest.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"corrupt manifest {path}: {e}", hint=f"run: glmlocal rm {name} --quant {quant}")

    def write_manifest(self, m: Manifest) -> Path:
        """Write atomically (temp file + fsync + rename) so a crash never leaves half a manifest."""
        m.updated_at = time.time()
        path = self.manifest_path(m.name, m.quant)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, m.to_json())
        return path

    def manifests(self) -> list[Manifest]:
        """Every manifest in the store, sorted by name then quant."""
        out = []
        for path in sorted(self.models_root.glob(f"*/*/{MANIFEST}")):
            m = self.read_manifest(path.parent.parent.name, path.parent.name)
            if m is not None:
                out.append(m)
        return out

    def gguf_path(self, m: Manifest) -> Path | None:
        return self.model_dir(m.name, m.quant) / m.gguf if m.gguf else None

    def bytes_on_disk(self, name: str, quant: str | None = None) -> int:
        """Bytes used by one quant (or a whole model, sources included), partial downloads counted."""
        root = self.model_dir(name, quant) if quant else self.model_root(name)
        return dir_size(root)

    def remove(self, name: str, quant: str | None = None) -> int:
        """Delete one quant, or the whole model (all quants and sources). Returns bytes freed."""
        target = self.model_dir(name, quant) if quant else self.model_root(name)
        if not target.exists():
            return 0
        freed = dir_size(target, only_unshared=True)  # hard links into the HF cache free nothing
        shutil.rmtree(target)
        parent = self.model_root(name)
        if quant and parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
        return freed

    @contextmanager
    def lock(self, name: str, quant: str) -> Iterator[None]:
        """Exclusive per model+quant lock so two pulls never write the same files."""
        d = self.model_dir(name, quant)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(
                    f"another glmlocal pull of {name} {quant} is running", hint="wait for it to finish"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def source_quant(dtype: str) -> str:
    return f"source-{dtype}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dir_size(path: Path, only_unshared: bool = False) -> int:
    """Bytes of the files under `path`; with only_unshared, files with other hard links are not counted."""
    total = 0
    paths = [path] if path.is_file() else (Path(d) / f for d, _, files in os.walk(path) for f in files)
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if not only_unshared or st.st_nlink <= 1:
            total += st.st_size
    return total


# ---------------------------------------------------------------------------------------------
# Free space
# ---------------------------------------------------------------------------------------------
def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free(path: Path, needed: int, what: str) -> None:
    """Raise DiskSpaceError (with both numbers) if `needed` bytes do not fit at `path`."""
    available = free_bytes(path)
    if needed > available:
        raise DiskSpaceError(str(path), needed, available, what=what)


# ---------------------------------------------------------------------------------------------
# Resolving a model spec
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedModel:
    """What a MODEL argument refers to.

    kind: "pulled" (complete in the store), "registry" (known but not pulled: `path` is None),
    "gguf" (a local GGUF file; the first file of a split set) or "checkpoint" (a safetensors directory).
    """

    kind: Literal["pulled", "registry", "gguf", "checkpoint"]
    path: Path | None
    name: str | None = None  # registry name when known
    quant: str | None = None
    spec: object | None = None  # registry ModelSpec when known
    family: str | None = None  # "glm45" | "glm47" when known from the registry
    manifest: Manifest | None = None

    def require_gguf(self) -> Path:
        """The GGUF to load, or a one-line InputError that says what to run."""
        if self.kind in ("pulled", "gguf") and self.path is not None:
            return self.path
        if self.kind == "checkpoint":
            raise InputError(
                f"{self.path} is a safetensors checkpoint, not a GGUF",
                hint=f"run: glmlocal convert {self.path} --quant q4_k_m",
            )
        state = f" (pull is {self.manifest.state})" if self.manifest else ""
        raise InputError(
            f"{self.name} {self.quant} is not pulled yet{state}",
            hint=f"run: glmlocal pull {self.name} --quant {self.quant}",
        )


def split_files(first: Path) -> list[Path]:
    """All files of a split GGUF given any one of them (llama.cpp's `%s-%05d-of-%05d.gguf`)."""
    m = SPLIT_RE.match(first.name)
    if not m:
        return [first]
    count = int(m["count"])
    return [first.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _is_first_or_single(path: Path) -> bool:
    m = SPLIT_RE.match(path.name)
    return m is None or int(m["no"]) == 1


def _resolve_gguf_file(path: Path) -> ResolvedModel:
    parts = split_files(path)
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise InputError(f"split GGUF {parts[0].name} is missing {len(missing)} part(s): {', '.join(missing)}")
    with open(parts[0], "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise InputError(f"{parts[0]} is not a GGUF file (bad magic)")
    return ResolvedModel(kind="gguf", path=parts[0])


def _resolve_dir(path: Path) -> ResolvedModel:
    if (path / MANIFEST).is_file():
        m = Manifest.from_json((path / MANIFEST).read_text())
        return _from_manifest(Store(path.parent.parent.parent), m, lookup_model(m.name))
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise InputError(f"{path}/config.json is not valid JSON: {e}")
        archs = config.get("architectures") or []
        if "Glm4MoeForCausalLM" not in archs:
            raise InputError(f"{path} is not a GLM-4.x MoE checkpoint (architectures: {archs or 'missing'})")
        return ResolvedModel(kind="checkpoint", path=path)
    ggufs = sorted(p for p in path.glob("*.gguf") if _is_first_or_single(p))
    if len(ggufs) == 1:
        return _resolve_gguf_file(ggufs[0])
    if ggufs:
        raise InputError(f"{path} holds several GGUF models: {', '.join(p.name for p in ggufs)}", hint="pass one file")
    raise InputError(f"{path} holds no GGUF file and no config.json")


def _from_manifest(store: Store, m: Manifest, spec: object | None = None) -> ResolvedModel:
    family = spec.family if spec is not None else None
    if m.state == "complete" and m.gguf:
        return ResolvedModel("pulled", store.gguf_path(m), m.name, m.quant, spec, family, m)
    return ResolvedModel("registry", None, m.name, m.quant, spec, family, m)


def _pick_quant(store: Store, spec: object, name: str) -> str:
    """No quant given: the only complete pull, else the registry default if pulled, else the default."""
    default = "q4_k_m"
    complete = [m.quant for m in store.manifests() if m.name == name and m.state == "complete"]
    if len(complete) == 1:
        return complete[0]
    return default


def resolve_model(spec: str, *, quant: str | None = None, store: Store | None = None) -> ResolvedModel:
    """Turn a MODEL argument into a ResolvedModel.

    Accepts a local GGUF path (any file of a split set resolves to the first one), a checkpoint directory, a
    pulled model's directory, or a registry name / alias with an optional quant (`glm-4.6:q4_k_m`, or the
    `quant` argument). Unknown names raise InputError listing the known models.
    """
    store = store or Store()
    path = Path(spec).expanduser()
    if path.is_file():
        return _resolve_gguf_file(path)
    if path.is_dir():
        return _resolve_dir(path)
    name, _, q = spec.partition(":")
    if q and quant and q.lower() != quant.lower():
        raise InputError(f"conflicting quants: {spec!r} and --quant {quant}")
    from glmlocal.models import registry

    model = lookup_model(name)
    if model is None:
        if spec.endswith(".gguf") or os.sep in spec:
            raise InputError(f"no such file or directory: {spec}")
        raise registry.unknown_model(name)
    quant = validate_quant(model, q or quant or _pick_quant(store, model, model.name))
    m = store.read_manifest(model.name, quant)
    if m is None:
        return ResolvedModel("registry", None, model.name, quant, model, model.family)
    return _from_manifest(store, m, model)


def lookup_model(name: str):
    """Registry lookup that returns None for an unknown name."""
    from glmlocal.models import registry

    return registry.find_model(name)


def validate_quant(model, quant: str) -> str:
    """Canonical quant name ('Q4_K_M' -> 'q4_k_m'), or InputError listing the valid ones."""
    from glmlocal.models import registry

    return registry.check_quant(model, quant)
