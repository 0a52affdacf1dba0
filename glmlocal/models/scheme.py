"""An FP8 source checkpoint's quantization scheme, read before any of its weights is downloaded.

`pull --from-source` reads config.json (a few KB) the way the converter will (quantize.fp8.read_scheme): an FP8
repository whose scheme the converter refuses is not downloaded; the BF16 one is converted instead when there is
one and no --source asked for FP8. The fetched config.json is put in its place, so the download does not fetch
it again; a kept source's current copy is read from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from glmlocal.errors import HubError
from glmlocal.models.hub import (
    HubClient,
    RemoteFile,
    RepoListing,
    digest_matches,
    hash_file,
)


def source_config(client: HubClient, listing: RepoListing, files: list[RemoteFile], local_dir: Path) -> bytes:
    """The source's config.json: the copy in `local_dir` when it is this commit's, else fetched alone."""
    rf = next(f for f in files if f.path == "config.json")  # select_source guarantees one
    local = local_dir / rf.path
    if local.is_file() and digest_matches(rf, hash_file(local, rf), rf.size):
        return local.read_bytes()
    buf = bytearray()
    client.stream_range(listing.repo, listing.commit, rf, on_chunk=buf.extend)
    return bytes(buf)


def check_scheme(config: bytes, listing: RepoListing) -> None:
    """Raise the converter's SchemeError when it would refuse the scheme config.json declares."""
    from quantize.fp8 import read_scheme

    try:
        parsed = json.loads(config)
    except ValueError as e:
        raise HubError(f"config.json of {listing.repo} at {listing.commit[:12]} is not valid JSON: {e}") from e
    read_scheme(parsed)


def put_config(local_dir: Path, config: bytes) -> None:
    """Put the config.json already fetched where the download expects it (it hashes it and keeps it)."""
    path = local_dir / "config.json"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("config.json.fetched")
    tmp.write_bytes(config)
    tmp.replace(path)
