"""Download throughput of glmlocal's resumable, verifying downloader against huggingface_hub's own
hf_hub_download, both fetching the same file from a local fake hub (tests/fakehub.py) in the same run.

    python bench/pull.py [--mb 256]

Prints MB/s for both and the ratio (glmlocal / huggingface_hub). glmlocal also hashes every byte (sha256)
while writing; hf_hub_download does not verify content hashes. Then a 4-part split GGUF behind a per-stream
rate cap: one file at a time against 4 at once (ratio = speedup from parallel files).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from huggingface_hub import hf_hub_download  # noqa: E402

from glmlocal.models.hub import HubClient  # noqa: E402
from glmlocal.models.pull import download_set, select_gguf  # noqa: E402
from glmlocal.models.store import FileEntry, Manifest, Store  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402

REPO = "bench/GLM-GGUF"
NAME = "Q4_K_M/GLM-Q4_K_M-00001-of-00001.gguf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeHub() as hub:
        src = Path(tmp) / "src.gguf"
        with open(src, "wb") as fh:
            for _ in range(args.mb):
                fh.write(os.urandom(1 << 20))
        hub.add_repo(REPO, {NAME: src})
        size = src.stat().st_size
        client = HubClient(endpoint_url=hub.url, token="")
        listing = client.listing(REPO)
        (rf,) = select_gguf(listing, "Q4_K_M/*.gguf")
        base, ours = [], []
        for i in range(args.repeat):
            cache = Path(tmp) / f"hf-{i}"
            t = time.perf_counter()
            hf_hub_download(REPO, NAME, endpoint=hub.url, cache_dir=str(cache), token=False)
            base.append(time.perf_counter() - t)
            dest = Path(tmp) / f"ours-{i}" / "model.gguf"
            t = time.perf_counter()
            client.download(REPO, listing.commit, rf, dest)
            ours.append(time.perf_counter() - t)
            assert dest.stat().st_size == size
        b, o = size / min(base) / 1e6, size / min(ours) / 1e6
        print(f"file: {size / 1e6:.0f} MB from a local fake hub (best of {args.repeat})")
        print(f"huggingface_hub.hf_hub_download: {b:8.1f} MB/s (no content hash)")
        print(f"glmlocal HubClient.download:     {o:8.1f} MB/s (sha256 verified, resumable)")
        print(f"ratio glmlocal / huggingface_hub: {o / b:.2f}")
        parallel_files(hub, Path(tmp), args.mb)


def parallel_files(hub: FakeHub, tmp: Path, mb: int) -> None:
    """A 4-part split GGUF behind a 25 MB/s per-stream cap (what a CDN edge often gives one connection)."""
    parts = {f"Q4_K_M/GLM-Q4_K_M-{i:05d}-of-00004.gguf": os.urandom(mb // 4 << 20) for i in range(1, 5)}
    hub.add_repo("bench/GLM-split", parts)
    hub.stream_bps = 25e6
    try:
        secs = {}
        for workers in (1, 4):
            client = HubClient(endpoint_url=hub.url, token="", workers=workers)
            listing = client.listing("bench/GLM-split")
            files = select_gguf(listing, "Q4_K_M/*.gguf")
            store = Store(tmp / f"store-{workers}")
            m = Manifest("bench", "q4_k_m", "gguf", listing.repo, listing.commit,
                         files=[FileEntry(Path(f.path).name, f.size, f.sha256) for f in files])
            t = time.perf_counter()
            download_set(client, listing, files, store.model_dir("bench", "q4_k_m"), m, store, lambda ev: None)
            secs[workers] = time.perf_counter() - t
        total = sum(len(v) for v in parts.values()) / 1e6
        print(f"split GGUF, 4 x {total / 4:.0f} MB, 25 MB/s per stream:")
        print(f"  one file at a time: {total / secs[1]:6.1f} MB/s")
        print(f"  4 files at once:    {total / secs[4]:6.1f} MB/s   ratio {secs[1] / secs[4]:.2f}")
    finally:
        hub.stream_bps = None


if __name__ == "__main__":
    main()
