"""A build cache for test fixtures (checkpoints, GGUFs) shared by every test in a run.

Artifacts live under $GLMLOCAL_TEST_CACHE (default ~/.cache/glmlocal-tests), keyed by a name plus a
hash of the source files that produce them, so editing the builder or the converter rebuilds them.
A file lock makes concurrent pytest processes build each artifact once; builds go to a temporary
directory that is renamed into place only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    root = Path(os.environ.get("GLMLOCAL_TEST_CACHE", Path.home() / ".cache" / "glmlocal-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def source_hash(globs: Iterable[str]) -> str:
    h = hashlib.sha256()
    for pattern in sorted(globs):
        for p in sorted(REPO.glob(pattern)):
            if p.is_file():
                h.update(str(p.relative_to(REPO)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cached_dir(name: str, depends_on: Iterable[str], build: Callable[[Path], None]) -> Path:
    """Return a directory holding the artifact `name`, calling build(tmp_dir) on a miss."""
    root = cache_root()
    final = root / f"{name}-{source_hash(depends_on)}"
    if (final / ".complete").exists():
        return final
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final
        tmp = root / f".{final.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok")
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune_other_revisions(root, name, keep=final)
    return final


def _prune_other_revisions(root: Path, name: str, keep: Path) -> None:
    """Drop builds of `name` made from older sources, so the cache does not grow with every edit."""
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{16}")
    for old in root.iterdir():
        if old != keep and pattern.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)
