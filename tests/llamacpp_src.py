"""llama.cpp's source tree (from the llama-cpp-python 0.3.36 sdist), fetched once into the test cache.

Used as the reference for the converter (convert_hf_to_gguf.py, gguf-py) and the quant-type snapshots.
Tests skip with a clear reason when the sdist cannot be fetched (offline, no PyPI).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from tests.cache import cached_dir

VERSION = "0.3.36"


def _fetch(d: Path) -> None:
    dl = d / "dl"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", str(dl)], check=True, capture_output=True, timeout=600)
    sdist = next(dl.glob("*.tar.gz"))
    prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and any(
            m.name.startswith(prefix + p) for p in ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "tests/snapshots/"))]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(d / "llama.cpp", members=members, filter="data")
    sdist.unlink()


def llamacpp_source() -> Path:
    """Root of llama.cpp's tree (only the converter, gguf-py and snapshots are extracted)."""
    try:
        return cached_dir(f"llamacpp-src-{VERSION}", [], _fetch) / "llama.cpp"
    except (subprocess.SubprocessError, OSError, StopIteration) as e:
        pytest.skip(f"llama-cpp-python {VERSION} sdist unavailable (offline?): {e}")


@contextmanager
def reference_gguf_py() -> Iterator[ModuleType]:
    """llama.cpp's own gguf-py (the sdist's, which matches its converter) imported as `gguf` for the duration.

    quantize uses the installed `gguf` package, an older release; both cannot be `gguf` at once, so the installed
    one is set aside (modules already holding it keep it) and put back afterwards.
    """
    def ours() -> dict[str, ModuleType]:
        return {k: m for k, m in sys.modules.items() if k == "gguf" or k.startswith("gguf.")}

    installed = ours()
    path = str(llamacpp_source() / "gguf-py")
    for k in installed:
        del sys.modules[k]
    sys.path.insert(0, path)
    try:
        import gguf

        yield gguf
    finally:
        sys.path.remove(path)
        for k in ours():
            del sys.modules[k]
        sys.modules.update(installed)
