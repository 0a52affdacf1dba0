"""glmlocal pull against a local hub (tests/fakehub.py): published GGUF path, resume, verification, errors."""

from __future__ import annotations

import os
import re

import pytest

from glmlocal.errors import DiskSpaceError, HubError, InputError
from glmlocal.models import hub as hubmod
from glmlocal.models.hub import FileDone, FileRetry, HubClient
from glmlocal.models.pull import PullStarted, pull
from glmlocal.models.store import Store, resolve_model
from tests.fakehub import Fault

REPO = "unsloth/GLM-4.6-GGUF"  # the real registry entry for glm-4.6 q4_k_m (Q4_K_M/GLM-4.6-Q4_K_M-*.gguf)
PART_SIZE = 300_000


def _split_parts(seed: int, n: int = 3) -> dict[str, bytes]:
    rng = __import__("random").Random(seed)
    return {
        f"Q4_K_M/GLM-4.6-Q4_K_M-{i:05d}-of-{n:05d}.gguf": b"GGUF" + rng.randbytes(PART_SIZE - 4)
        for i in range(1, n + 1)
    }




@pytest.fixture
def gguf_repo(fakehub):
    parts = _split_parts(0)
    parts["README.md"] = b"# not downloaded\n"
    parts["Q6_K/GLM-4.6-Q6_K.gguf"] = b"GGUF other quant"
    fakehub.add_repo(REPO, parts)
    return parts


def _client(**kw) -> HubClient:
    kw.setdefault("retry_wait", 0.0)
    return HubClient(**kw)


def _events(collector: list):
    return collector.append


def test_pull_published_split_gguf(fakehub, gguf_repo):
    events: list = []
    m = pull("glm-4.6", "Q4_K_M", client=_client(), progress=_events(events))
    store = Store()
    assert m.state == "complete" and m.verified and m.method == "gguf" and m.repo == REPO
    assert m.revision == fakehub.repos[REPO].refs["main"]
    assert [f.path for f in m.files] == [f"GLM-4.6-Q4_K_M-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    for path, data in gguf_repo.items():
        if path.startswith("Q4_K_M/"):
            assert (store.model_dir("glm-4.6", "q4_k_m") / os.path.basename(path)).read_bytes() == data
            assert fakehub.served(REPO, path) == len(data)  # each byte fetched exactly once
    assert fakehub.served(REPO, "Q6_K/GLM-4.6-Q6_K.gguf") == 0
    assert not list(store.model_dir("glm-4.6", "q4_k_m").glob("*.incomplete"))
    # HF_ENDPOINT was honoured: the listing and the downloads went to the fake hub
    assert any(r["path"].startswith(f"/api/models/{REPO}") for r in fakehub.requests)
    started = [e for e in events if isinstance(e, PullStarted)][0]
    assert started.total == 3 * PART_SIZE and started.files == 3 and started.present == 0
    assert [e.how for e in events if isinstance(e, FileDone)] == ["downloaded"] * 3
    last = [e for e in events if isinstance(e, hubmod.FileProgress)][-1]
    assert last.done == last.total == 3 * PART_SIZE
    r = resolve_model("glm-4.6")
    assert r.kind == "pulled" and r.path.name.endswith("-00001-of-00003.gguf") and r.family == "glm45"
    # a second pull finds everything present and fetches nothing
    before = sum(fakehub.bytes_sent.values())
    events.clear()
    pull("glm-4.6", "q4_k_m", client=_client(), progress=_events(events))
    assert sum(fakehub.bytes_sent.values()) == before
    assert [e.how for e in events if isinstance(e, FileDone)] == ["present"] * 3


def test_interrupted_pull_resumes_without_refetching(fakehub, gguf_repo):
    part2 = "Q4_K_M/GLM-4.6-Q4_K_M-00002-of-00003.gguf"
    fakehub.faults.append(Fault(path=part2, kind="drop", at=123_457))
    with pytest.raises(HubError) as exc:  # one file at a time, so the server's byte counts are exact
        pull("glm-4.6", "q4_k_m", client=_client(retries=0, workers=1))
    assert re.search(r"network failure.*123,457 of 300,000 bytes kept.*run the same command again to resume",
                     exc.value.one_line())
    store = Store()
    d = store.model_dir("glm-4.6", "q4_k_m")
    m = store.read_manifest("glm-4.6", "q4_k_m")
    assert m.state == "downloading" and [f.verified for f in m.files] == [True, False, False]
    assert not (d / os.path.basename(part2)).exists()  # nothing half-written under the final name
    (partial,) = d.glob("*-00002-of-00003.gguf.*.incomplete")
    assert partial.stat().st_size == 123_457
    assert resolve_model("glm-4.6:q4_k_m").kind == "registry"

    events: list = []
    m = pull("glm-4.6", "q4_k_m", client=_client(retries=0, workers=1), progress=_events(events))
    assert m.state == "complete"
    assert (d / os.path.basename(part2)).read_bytes() == gguf_repo[part2]
    for path in gguf_repo:
        if path.startswith("Q4_K_M/"):
            assert fakehub.served(REPO, path) == PART_SIZE  # across both runs: no byte twice
    ranges = [r["range"] for r in fakehub.requests if r["path"].endswith("00002-of-00003.gguf") and r["method"] == "GET"]
    assert ranges == [None, "bytes=123457-"]
    assert [e.how for e in events if isinstance(e, FileDone)] == ["present", "resumed", "downloaded"]
    assert [e for e in events if isinstance(e, PullStarted)][0].present == PART_SIZE + 123_457


def test_network_drop_is_retried_within_a_run(fakehub, gguf_repo):
    part1 = "Q4_K_M/GLM-4.6-Q4_K_M-00001-of-00003.gguf"
    fakehub.faults.append(Fault(path=part1, kind="drop", at=70_000, times=2))
    events: list = []
    pull("glm-4.6", "q4_k_m", client=_client(retries=2), progress=_events(events))
    assert len([e for e in events if isinstance(e, FileRetry)]) == 2
    assert fakehub.served(REPO, part1) == PART_SIZE


def test_corrupt_file_is_fetched_again(fakehub, gguf_repo):
    part3 = "Q4_K_M/GLM-4.6-Q4_K_M-00003-of-00003.gguf"
    fakehub.faults.append(Fault(path=part3, kind="corrupt", at=4321))
    events: list = []
    m = pull("glm-4.6", "q4_k_m", client=_client(), progress=_events(events))
    assert m.verified
    assert (Store().model_dir("glm-4.6", "q4_k_m") / os.path.basename(part3)).read_bytes() == gguf_repo[part3]
    assert fakehub.served(REPO, part3) == 2 * PART_SIZE
    assert any(isinstance(e, FileRetry) and "checksum" in e.reason for e in events)


def test_persistently_corrupt_file_fails_and_leaves_no_final_file(fakehub, gguf_repo):
    part1 = "Q4_K_M/GLM-4.6-Q4_K_M-00001-of-00003.gguf"
    fakehub.faults.append(Fault(path=part1, kind="corrupt", at=10, times=5))
    with pytest.raises(HubError, match="failed verification twice"):
        pull("glm-4.6", "q4_k_m", client=_client())
    d = Store().model_dir("glm-4.6", "q4_k_m")
    assert not list(d.glob("*-00001-of-00003.gguf*"))  # neither a final file nor a partial one
    assert Store().read_manifest("glm-4.6", "q4_k_m").state == "downloading"


def test_corrupt_file_under_final_name_is_replaced(fakehub, gguf_repo):
    pull("glm-4.6", "q4_k_m", client=_client())
    store = Store()
    m = store.read_manifest("glm-4.6", "q4_k_m")
    for f in m.files:
        f.verified = False  # as if an older glmlocal had written them without verifying
    store.write_manifest(m)
    victim = store.model_dir("glm-4.6", "q4_k_m") / m.files[1].path
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    pull("glm-4.6", "q4_k_m", client=_client())
    assert victim.read_bytes() == gguf_repo["Q4_K_M/" + m.files[1].path]
    assert fakehub.served(REPO, "Q4_K_M/" + m.files[1].path) == 2 * PART_SIZE
    assert fakehub.served(REPO, "Q4_K_M/" + m.files[0].path) == PART_SIZE


def test_disk_preflight_refuses_with_numbers(fakehub, gguf_repo, monkeypatch):
    import shutil as _shutil

    real = _shutil.disk_usage
    monkeypatch.setattr("glmlocal.models.store.shutil.disk_usage",
                        lambda p: real(p)._replace(free=500_000))
    with pytest.raises(DiskSpaceError) as exc:
        pull("glm-4.6", "q4_k_m", client=_client())
    assert exc.value.needed == 3 * PART_SIZE and exc.value.available == 500_000
    assert "need 0.00 GiB" in str(exc.value) or "need" in exc.value.one_line()
    assert not [r for r in fakehub.requests if "/resolve/" in r["path"]]  # refused before any download


def test_gated_repository_token_handling(fakehub, monkeypatch):
    fakehub.add_repo(REPO, _split_parts(1, n=1) | {}, gated=True)
    with pytest.raises(HubError, match="gated repository and no Hugging Face token is set"):
        pull("glm-4.6", "q4_k_m", client=_client())
    with pytest.raises(HubError, match="token has no access to the gated repository"):
        pull("glm-4.6", "q4_k_m", client=_client(token="hf_wrong"))
    monkeypatch.setenv("HF_TOKEN", "hf_good_token")  # huggingface_hub's own token lookup
    m = pull("glm-4.6", "q4_k_m", client=_client())
    assert m.state == "complete"
    assert {r["auth"] for r in fakehub.requests if "/resolve/" in r["path"]} >= {"hf_good_token"}


def test_missing_repository_file_and_revision(fakehub):
    with pytest.raises(HubError, match=f"repository {REPO} not found"):
        pull("glm-4.6", "q4_k_m", client=_client())
    fakehub.add_repo(REPO, {"Q8_0/GLM-4.6-Q8_0.gguf": b"GGUF"})
    with pytest.raises(HubError, match="no file matching 'Q4_K_M/GLM-4.6-Q4_K_M-\\*.gguf'"):
        pull("glm-4.6", "q4_k_m", client=_client())
    with pytest.raises(HubError, match="revision 'v9' not found"):
        pull("glm-4.6", "q8_0", revision="v9", client=_client())


def test_incomplete_split_set_is_refused(fakehub):
    parts = _split_parts(2)
    del parts["Q4_K_M/GLM-4.6-Q4_K_M-00002-of-00003.gguf"]
    fakehub.add_repo(REPO, parts)
    with pytest.raises(HubError, match="incomplete or mixed"):
        pull("glm-4.6", "q4_k_m", client=_client())


def test_revision_pins_a_commit(fakehub):
    old = fakehub.add_repo(REPO, _split_parts(3))
    fakehub.add_repo(REPO, _split_parts(4))
    m = pull("glm-4.6", "q4_k_m", revision=old, client=_client())
    assert m.revision == old and m.requested_revision == old
    got = (Store().model_dir("glm-4.6", "q4_k_m") / m.files[0].path).read_bytes()
    assert got == _split_parts(3)["Q4_K_M/" + m.files[0].path]
    # moving to main replaces files whose hashes changed
    m2 = pull("glm-4.6", "q4_k_m", client=_client())
    assert m2.revision != old
    got = (Store().model_dir("glm-4.6", "q4_k_m") / m2.files[0].path).read_bytes()
    assert got == _split_parts(4)["Q4_K_M/" + m2.files[0].path]


def test_unknown_model_and_quant(fakehub):
    with pytest.raises(InputError, match="unknown model 'glm-9'.*known models: glm-4.5"):
        try:
            pull("glm-9", "q4_k_m", client=_client())
        except InputError as e:
            raise InputError(e.one_line()) from e
    with pytest.raises(InputError, match="unknown quant 'q3_k'.*q4_k_m, q6_k, q8_0, bf16"):
        try:
            pull("glm-4.6", "q3_k", client=_client())
        except InputError as e:
            raise InputError(e.one_line()) from e
    assert not fakehub.requests


def test_unreachable_endpoint():
    client = HubClient(endpoint_url="http://127.0.0.1:9", retries=0, retry_wait=0.0)
    with pytest.raises(HubError, match="cannot reach http://127.0.0.1:9"):
        client.listing(REPO)


def test_reuses_verified_file_from_hf_cache(fakehub, gguf_repo, tmp_path):
    from huggingface_hub import hf_hub_download

    part1 = "Q4_K_M/GLM-4.6-Q4_K_M-00001-of-00003.gguf"
    hf_hub_download(REPO, part1, endpoint=fakehub.url, cache_dir=os.environ["HF_HUB_CACHE"])
    assert fakehub.served(REPO, part1) == PART_SIZE
    events: list = []
    pull("glm-4.6", "q4_k_m", client=_client(), progress=_events(events))
    assert fakehub.served(REPO, part1) == PART_SIZE  # not downloaded a second time
    how = {e.path: e.how for e in events if isinstance(e, FileDone)}  # files finish in any order
    assert how[os.path.basename(part1)] == "hf-cache"
    # the store's copy is a hard link into the HF cache: removing it frees nothing of that file
    store = Store()
    freed = store.remove("glm-4.6", "q4_k_m")
    assert 2 * PART_SIZE <= freed < 3 * PART_SIZE


def test_disk_full_mid_file_keeps_partial_and_resumes(fakehub, gguf_repo, monkeypatch):
    import builtins
    import errno

    written = {"n": 0}

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def __getattr__(self, name):  # everything but write: the real file's
            return getattr(self.fh, name)

        def write(self, data):
            if written["n"] + len(data) > 400_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            written["n"] += len(data)
            return self.fh.write(data)

    def full_open(path, mode="r", *a, **kw):
        fh = builtins.open(path, mode, *a, **kw)
        return FullDisk(fh) if mode == "ab" else fh

    monkeypatch.setattr(hubmod, "open", full_open, raising=False)
    with pytest.raises(DiskSpaceError, match="not enough disk space for download"):
        pull("glm-4.6", "q4_k_m", client=_client(workers=1))
    d = Store().model_dir("glm-4.6", "q4_k_m")
    assert not (d / "GLM-4.6-Q4_K_M-00002-of-00003.gguf").exists()
    (partial,) = d.glob("*-00002-of-00003.gguf.*.incomplete")
    assert partial.stat().st_size == written["n"] - PART_SIZE > 0
    monkeypatch.setattr(hubmod, "open", builtins.open, raising=False)  # space freed
    assert pull("glm-4.6", "q4_k_m", client=_client()).state == "complete"
    kept = written["n"] - PART_SIZE
    gets = [r["range"] for r in fakehub.requests if r["path"].endswith("00002-of-00003.gguf") and r["method"] == "GET"]
    assert gets[-1] == f"bytes={kept}-"  # the resume asked only for the missing bytes


def test_rate_meter_uses_a_sliding_window(monkeypatch):
    clock = {"t": 100.0}
    monkeypatch.setattr(hubmod.time, "monotonic", lambda: clock["t"])
    meter = hubmod.RateMeter(total=10_000_000)
    for i in range(1, 11):  # 1 MB per second
        clock["t"] += 1.0
        rate, eta = meter.update(i * 1_000_000)
    assert rate == pytest.approx(1_000_000) and eta == pytest.approx(0.0)
    meter = hubmod.RateMeter(total=10_000_000)
    clock["t"] += 1.0
    rate, eta = meter.update(2_000_000)
    assert rate == pytest.approx(2_000_000) and eta == pytest.approx(4.0)


def test_private_repository_needs_a_token(fakehub, monkeypatch):
    fakehub.add_repo(REPO, _split_parts(5, n=1), private=True)
    with pytest.raises(HubError, match="not found on .*if it is private, set HF_TOKEN"):
        pull("glm-4.6", "q4_k_m", client=_client())
    monkeypatch.setenv("HF_TOKEN", "hf_good_token")
    assert pull("glm-4.6", "q4_k_m", client=_client()).state == "complete"


def test_ctrl_c_mid_file_keeps_partial_and_resumes(fakehub, gguf_repo, monkeypatch):
    monkeypatch.setattr("glmlocal.models.pull.PROGRESS_EVERY_S", 0.0)  # an event per received chunk

    def interrupt(ev):
        if isinstance(ev, hubmod.FileProgress) and ev.done >= PART_SIZE + 50_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull("glm-4.6", "q4_k_m", client=_client(workers=1), progress=interrupt)
    d = Store().model_dir("glm-4.6", "q4_k_m")
    (partial,) = d.glob("*-00002-of-00003.gguf.*.incomplete")
    kept = partial.stat().st_size
    assert 50_000 <= kept < PART_SIZE and not (d / "GLM-4.6-Q4_K_M-00002-of-00003.gguf").exists()
    assert Store().read_manifest("glm-4.6", "q4_k_m").state == "downloading"
    pull("glm-4.6", "q4_k_m", client=_client())
    gets = [r["range"] for r in fakehub.requests if r["path"].endswith("00002-of-00003.gguf") and r["method"] == "GET"]
    assert gets[-1] == f"bytes={kept}-"
    assert (d / "GLM-4.6-Q4_K_M-00002-of-00003.gguf").read_bytes() == gguf_repo[
        "Q4_K_M/GLM-4.6-Q4_K_M-00002-of-00003.gguf"]


def test_offline_mode(fakehub, gguf_repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        pull("glm-4.6", "q4_k_m", client=_client())
    monkeypatch.delenv("HF_HUB_OFFLINE")
    pull("glm-4.6", "q4_k_m", client=_client())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(fakehub.requests)
    assert pull("glm-4.6", "q4_k_m", client=_client()).state == "complete"  # already here: no hub needed
    assert len(fakehub.requests) == n


def test_fakehub_speaks_the_hub_api_huggingface_hub_uses(fakehub, gguf_repo):
    """The fake hub's listing endpoints, as huggingface_hub's own client parses them."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    api = HfApi(endpoint=fakehub.url, token=False)
    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    part = "Q4_K_M/GLM-4.6-Q4_K_M-00001-of-00003.gguf"
    assert tree[part].size == PART_SIZE and tree[part].lfs.sha256 == __import__("hashlib").sha256(
        gguf_repo[part]).hexdigest()
    assert tree["README.md"].lfs is None
    top = {f.path for f in api.list_repo_tree(REPO)}
    assert top == {"README.md", "Q4_K_M", "Q6_K"}
    (info,) = api.get_paths_info(REPO, [part])
    assert info.lfs.sha256 == tree[part].lfs.sha256
    meta = get_hf_file_metadata(hf_hub_url(REPO, part, endpoint=fakehub.url), token=False)
    assert meta.commit_hash == fakehub.repos[REPO].refs["main"] and meta.size == PART_SIZE
    assert meta.etag == tree[part].lfs.sha256


def test_parallel_files_stop_together_and_all_resume(fakehub, gguf_repo):
    """Three parts in flight at once; one fails for good: the others stop, keep their partial files, and the
    next run asks each one only for its missing bytes."""
    gguf_repo = dict(gguf_repo)
    big = _split_parts(6)
    big = {k: v * 20 for k, v in big.items()}  # 6 MB parts, so the others are still in flight
    fakehub.add_repo(REPO, big)
    part2 = "Q4_K_M/GLM-4.6-Q4_K_M-00002-of-00003.gguf"
    fakehub.faults.append(Fault(path=part2, kind="drop", at=2_000_000))
    events: list = []
    with pytest.raises(HubError, match="network failure"):
        pull("glm-4.6", "q4_k_m", client=_client(retries=0, workers=3), progress=_events(events))
    assert {e.path for e in events if isinstance(e, hubmod.FileStarted)} == {os.path.basename(p) for p in big}
    d = Store().model_dir("glm-4.6", "q4_k_m")
    kept = {p.name.split(".gguf")[0]: p.stat().st_size for p in d.glob("*.incomplete")}
    done = {p.name for p in d.glob("*.gguf")}
    assert kept or done
    pull("glm-4.6", "q4_k_m", client=_client(workers=3))
    for path, data in big.items():
        name = os.path.basename(path)
        assert (d / name).read_bytes() == data
        gets = [r["range"] for r in fakehub.requests if r["path"].endswith(name) and r["method"] == "GET"]
        stem = name.split(".gguf")[0]
        if stem in kept:
            assert gets[-1] == f"bytes={kept[stem]}-"
        else:
            assert name in done and len(gets) == 1


# ---------------------------------------------------------------------------------------------
# The one ranged GET (downloads and remote GGUF headers)
# ---------------------------------------------------------------------------------------------
def _remote(fakehub, path: str) -> tuple[str, hubmod.RemoteFile]:
    listing = _client().listing(REPO)
    return listing.commit, next(f for f in listing.files if f.path == path)


def _read(client: HubClient, commit: str, rf, start: int, end: int | None, **kw) -> bytes:
    data = bytearray()
    client.stream_range(REPO, commit, rf, start, end, on_chunk=data.extend, **kw)
    return bytes(data)


def test_stream_range_reads_exactly_the_asked_bytes(fakehub, gguf_repo):
    part = "Q4_K_M/GLM-4.6-Q4_K_M-00001-of-00003.gguf"
    commit, rf = _remote(fakehub, part)
    assert _read(_client(), commit, rf, 1000, 5000) == gguf_repo[part][1000:5000]
    assert _read(_client(), commit, rf, 299_990, None) == gguf_repo[part][299_990:]
    assert _read(_client(), commit, rf, 7, 7) == b""  # nothing asked: no request
    gets = [r["range"] for r in fakehub.requests if r["path"].endswith(part)]
    assert gets == ["bytes=1000-4999", "bytes=299990-"]


@pytest.mark.parametrize("kind", ["drop", "short"])
def test_stream_range_resumes_after_a_drop_or_an_early_end(fakehub, gguf_repo, kind):
    """A cut connection and a body that simply ends early are both retried from the first missing byte."""
    part = "Q4_K_M/GLM-4.6-Q4_K_M-00002-of-00003.gguf"
    commit, rf = _remote(fakehub, part)
    fakehub.faults.append(Fault(path=part, kind=kind, at=3000, times=1))
    retries: list = []
    got = _read(_client(retries=1), commit, rf, 1000, 9000, on_retry=lambda n, at, e: retries.append((n, at)))
    assert got == gguf_repo[part][1000:9000] and retries == [(1, 3000)]
    gets = [r["range"] for r in fakehub.requests if r["path"].endswith(part)]
    assert gets == ["bytes=1000-8999", "bytes=3000-8999"]
    assert fakehub.served(REPO, part) == 8000  # no byte twice


def test_stream_range_gives_up_after_its_retries_with_where_it_got(fakehub, gguf_repo):
    part = "Q4_K_M/GLM-4.6-Q4_K_M-00002-of-00003.gguf"
    commit, rf = _remote(fakehub, part)
    fakehub.faults.append(Fault(path=part, kind="short", at=2500, times=5))
    with pytest.raises(hubmod.TransferFailed) as exc:
        _read(_client(retries=2), commit, rf, 0, 9000)
    assert exc.value.reached == 2500 and "closed at byte 2,500 of 9,000" in exc.value.message
    assert len([r for r in fakehub.requests if r["path"].endswith(part)]) == 3


def test_stream_range_retries_busy_statuses_and_maps_hub_errors(fakehub, gguf_repo):
    part = "Q4_K_M/GLM-4.6-Q4_K_M-00003-of-00003.gguf"
    commit, rf = _remote(fakehub, part)
    fakehub.faults.append(Fault(path=part, kind="status", status=503, times=1))
    assert _read(_client(retries=1), commit, rf, 0, 100) == gguf_repo[part][:100]
    missing = hubmod.RemoteFile("Q4_K_M/nope.gguf", 100, None, None)
    with pytest.raises(HubError, match="Q4_K_M/nope.gguf not found in unsloth/GLM-4.6-GGUF"):
        _read(_client(), commit, missing, 0, 10)


def test_stream_range_refuses_a_misplaced_range_and_an_ignored_one(fakehub, gguf_repo):
    part = "Q4_K_M/GLM-4.6-Q4_K_M-00001-of-00003.gguf"
    commit, rf = _remote(fakehub, part)
    fakehub.faults.append(Fault(path=part, kind="badrange", times=1))
    with pytest.raises(HubError, match="answered a byte-range request for .* with 'bytes 101-199/300000'"):
        _read(_client(), commit, rf, 100, 200)
    fakehub.ranges = False
    chunks: list = []
    with pytest.raises(hubmod.RangeIgnored, match="ignored a byte-range request"):
        _client().stream_range(REPO, commit, rf, 100, 200, on_chunk=chunks.append)
    assert chunks == []  # the whole-file answer was not read
    restarts: list = []
    got = _read(_client(), commit, rf, 100, None, on_restart=lambda: restarts.append(1))
    assert got == gguf_repo[part] and restarts == [1]  # the whole file, from byte 0


def test_download_starts_over_when_the_server_ignores_range(fakehub, gguf_repo):
    part2 = "Q4_K_M/GLM-4.6-Q4_K_M-00002-of-00003.gguf"
    fakehub.faults.append(Fault(path=part2, kind="drop", at=100_000))
    with pytest.raises(HubError, match="100,000 of 300,000 bytes kept"):
        pull("glm-4.6", "q4_k_m", client=_client(retries=0, workers=1))
    fakehub.ranges = False
    events: list = []
    m = pull("glm-4.6", "q4_k_m", client=_client(workers=1), progress=_events(events))
    assert m.verified
    d = Store().model_dir("glm-4.6", "q4_k_m")
    assert (d / os.path.basename(part2)).read_bytes() == gguf_repo[part2]
    assert fakehub.served(REPO, part2) == 100_000 + PART_SIZE
    last = [e for e in events if isinstance(e, hubmod.FileProgress)][-1]
    assert last.done == last.total == 3 * PART_SIZE  # the discarded partial bytes were taken back


def test_download_that_starts_over_mid_resume_keeps_its_accounts(fakehub, gguf_repo):
    """Resumed (206) bytes arrive, the connection drops, and the retry gets the whole file (200): the partial
    file and the progress both start over from byte 0."""
    part2 = "Q4_K_M/GLM-4.6-Q4_K_M-00002-of-00003.gguf"
    fakehub.faults.append(Fault(path=part2, kind="drop", at=100_000))
    with pytest.raises(HubError):
        pull("glm-4.6", "q4_k_m", client=_client(retries=0, workers=1))
    fakehub.faults.append(Fault(path=part2, kind="drop", at=150_000))
    events: list = []

    def progress(ev):
        events.append(ev)
        if isinstance(ev, FileRetry):
            fakehub.ranges = False  # the retry is answered with the whole file

    m = pull("glm-4.6", "q4_k_m", client=_client(retries=1, workers=1), progress=progress)
    assert m.verified and len([e for e in events if isinstance(e, FileRetry)]) == 1
    d = Store().model_dir("glm-4.6", "q4_k_m")
    assert (d / os.path.basename(part2)).read_bytes() == gguf_repo[part2]
    assert fakehub.served(REPO, part2) == 150_000 + PART_SIZE
    last = [e for e in events if isinstance(e, hubmod.FileProgress)][-1]
    assert last.done == last.total == 3 * PART_SIZE and last.file_done == PART_SIZE
