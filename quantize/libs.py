"""Where llama-cpp-python's shared libraries are, and which file of each a process must open.

A wheel cannot hold symlinks, so `libggml-base.so`, `libggml-base.so.0` and `libggml-base.so.0.25.3` are
three copies of one file. libllama links `libggml-base.so.0` (the SONAME); opening another copy by path
loads a second ggml with its own globals (backend registry, quantization tables), so every ctypes binding
opens the `.so.0` copy. Standard library only: quantize.ggml uses it without importing llama_cpp.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def lib_dir() -> Path | None:
    """Directory holding llama-cpp-python's shared libraries (found without importing llama_cpp), or None
    when llama-cpp-python is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "lib"


def lib_path(name: str, directory: Path) -> Path:
    """The file of `lib{name}` in `directory` that libllama itself loads: the `.so.0` copy (its SONAME)
    when there is one, else `lib{name}.so` (a build that ships only that name)."""
    soname = directory / f"lib{name}.so.0"
    return soname if soname.exists() else directory / f"lib{name}.so"
