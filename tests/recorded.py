"""Outputs recorded on real machines (tests/data/machines/*.txt), for tests of what glmlocal parses from them.

Every file starts with its source (an issue, PR, log or document; an "index id" is a public GitHub file the
search index could not name) and holds verbatim excerpts, with `#` comment lines between blocks saying where
each came from. Nothing in them was run here: these machines (Macs, AMD APUs, DGX Spark, NVIDIA desktops) are
not available to the test suite.
"""

from __future__ import annotations

import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "machines"


def recorded(name: str) -> str:
    """The whole file."""
    return (DATA / name).read_text()


def source(name: str) -> str:
    """The file's first line: where its contents come from."""
    return recorded(name).splitlines()[0]


def block_after(name: str, marker: str) -> str:
    """The lines after the first line containing `marker`, up to the next blank, comment or `$ command` line."""
    lines = recorded(name).splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line) + 1
    out = []
    for line in lines[start:]:
        if not line.strip() or line.lstrip().startswith(("#", "$")):
            break
        out.append(line)
    return "\n".join(out) + "\n"


def list_devices(name: str) -> list[tuple[str, str, int, int]]:
    """(name, description, total bytes, free bytes) of every `llama-server --list-devices` line in the file:
    "  MTL0: Apple M1 Max (25559 MiB, 25558 MiB free)" (common/arg.cpp prints what ggml_backend_dev_memory says)."""
    pat = re.compile(r"^\s+(\w+): (.+) \((\d+) MiB, (\d+) MiB free\)\s*$", re.M)
    return [(m.group(1), m.group(2), int(m.group(3)) << 20, int(m.group(4)) << 20)
            for m in pat.finditer(recorded(name))]
