"""Shared fixtures. Checkpoints and GGUFs are built once per source revision (see tests/cache.py)."""

from __future__ import annotations

import os

# Keep torch / llama.cpp from oversubscribing the 2-core CI machine when several things run.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
