"""Published-only quants (UD-Q2_K_XL...): planning before download from remote GGUF headers, the header cache,
the no-fit hint naming a published quant, and pulling one. Against the fake hub on 127.0.0.1.

The converter cannot write IQ/Q2 types, but reading headers is type-agnostic: a real converted fixture GGUF,
split like llama.cpp's gguf-split and published under a UD-style name, proves the mechanism; for the real files
the sizes come from their real headers at run time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glmlocal.cli.app import app
from glmlocal.models.registry import get_model
from glmlocal.models.store import Store
from quantize.gguf_reader import read_gguf
from tests.fakehub import split_gguf

REPO = "unsloth/GLM-4.6-GGUF"
STEM = "GLM-4.6-UD-Q2_K_XL"
CPU_8G = ["--cpu-only", "--ram", "8GiB", "--threads", "2", "--cpu-bw", "50"]
BIG_BOX = ["--gpu-mem", "24GiB", "--ram", "128GiB", "--threads", "16", "--gpu-bw", "936", "--cpu-bw", "89.6"]


def _cli(*args: str):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="session")
def ud_parts(gguf_factory, tmp_path_factory) -> list[Path]:
    """A real q4_k_m fixture GGUF split in 3 parts named like unsloth's GLM-4.6 UD-Q2_K_XL files."""
    out = tmp_path_factory.mktemp("ud")
    return split_gguf(Path(gguf_factory("tiny", "q4_k_m")), out, STEM, 3)


@pytest.fixture
def published(fakehub, ud_parts, monkeypatch):
    """The split set published at UD-Q2_K_XL/...; small first reads so the doubling loop is exercised."""
    monkeypatch.setattr("glmlocal.models.remote.FIRST_READ", 16 << 10)
    fakehub.add_repo(REPO, {f"UD-Q2_K_XL/{p.name}": p for p in ud_parts})
    return fakehub


def _resolve_requests(hub) -> list[dict]:
    return [r for r in hub.requests if "/resolve/" in r["path"] or r["path"].startswith("/cdn/")]


def _plan_json(*args: str) -> dict:
    code, out, err = _cli("plan", *args, "--json")
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------------------------------------
# Planning before download
# ---------------------------------------------------------------------------------------------
def test_plan_from_remote_headers_equals_plan_of_downloaded_files(published, ud_parts):
    before = _plan_json("glm-4.6", "--quant", "UD-Q2_K_XL", *CPU_8G)
    assert before["quant"] == "ud-q2_k_xl" and before["sizes_from"] == "remote-header"
    remote = before["remote"]
    assert remote["repo"] == REPO and not remote["cached"] and len(remote["files"]) == 3
    assert [f["path"] for f in remote["files"]] == [f"UD-Q2_K_XL/{p.name}" for p in ud_parts]
    assert "GGUF headers of unsloth/GLM-4.6-GGUF@" in before["footprint_source"]
    # every header request was a Range request, and together they are a small part of the files
    reqs = _resolve_requests(published)
    assert reqs and all(r["range"] and r["range"].startswith("bytes=") for r in reqs)
    fetched = sum(published.bytes_sent.values())
    total = sum(p.stat().st_size for p in ud_parts)
    assert fetched == remote["fetched_bytes"]  # what the plan reports is what the hub served
    header_bytes = sum(read_gguf(p).data_offset for p in ud_parts)
    assert header_bytes <= fetched <= 2 * header_bytes + 3 * (16 << 10)  # doubling overshoots by < 2x
    assert fetched < 0.1 * total, (fetched, total)

    code, _, err = _cli("pull", "glm-4.6", "--quant", "ud-q2_k_xl")
    assert code == 0, err
    after = _plan_json("glm-4.6", "--quant", "ud_q2_k_xl", *CPU_8G)
    assert after["sizes_from"] == "local-file" and after["quant"] == "ud-q2_k_xl"
    for key in ("model", "file_bytes", "weights_bytes", "kv_bytes_per_token", "placement"):
        assert before[key] == after[key], key
    from glmlocal.plan.footprint import footprint_from_gguf

    assert before["file_bytes"] == footprint_from_gguf(ud_parts[0]).file_bytes


def test_header_cache_is_reused_offline_and_instantly(published, ud_parts, monkeypatch):
    first = _plan_json("glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    n_requests = len(published.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = _plan_json("glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert len(published.requests) == n_requests  # not one request: no listing, no range
    assert again["remote"]["cached"] and again["remote"]["fetched_bytes"] == 0
    assert again["placement"] == first["placement"] and again["file_bytes"] == first["file_bytes"]
    # the cache holds each file's header and nothing more
    cache = Store().root / "headers" / "unsloth" / "GLM-4.6-GGUF"
    files = sorted(cache.rglob("*.gguf"))
    assert [f.name for f in files] == [p.name for p in ud_parts]
    for f, p in zip(files, ud_parts):
        assert f.read_bytes() == p.read_bytes()[:read_gguf(p).data_offset]


def test_published_quant_missing_from_the_repository(fakehub, ud_parts):
    fakehub.add_repo(REPO, {f"UD-Q3_K_XL/{p.name}": p for p in ud_parts})  # another folder only
    code, _, err = _cli("plan", "glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert code == 1 and err.count("\n") == 1
    assert "no file matching 'UD-Q2_K_XL/GLM-4.6-UD-Q2_K_XL-*.gguf' in unsloth/GLM-4.6-GGUF" in err
    assert "models.toml's pattern is out of date" in err


def test_offline_without_cache_is_one_clear_line(published, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _cli("plan", "glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert code == 1 and err.count("\n") == 1
    assert "HF_HUB_OFFLINE is set and the GGUF headers of glm-4.6 ud-q2_k_xl are not cached" in err
    assert not published.requests


def test_redirected_downloads_and_tokens_are_handled(published, monkeypatch):
    """The real hub 302s LFS files to a CDN: the Range request must survive the redirect."""
    published.redirect_lfs = True
    monkeypatch.setenv("HF_TOKEN", "hf_good_token")
    doc = _plan_json("glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert doc["sizes_from"] == "remote-header"
    cdn = [r for r in published.requests if r["path"].startswith("/cdn/")]
    assert cdn and all(r["range"] for r in cdn)
    hub_side = [r for r in published.requests if "/resolve/" in r["path"]]
    assert hub_side and all(r["auth"] == "hf_good_token" for r in hub_side)


def test_dropped_connection_while_reading_a_header_is_retried(published, monkeypatch):
    from tests.fakehub import Fault

    monkeypatch.setattr("glmlocal.models.hub.DEFAULT_RETRY_WAIT", 0.0)
    published.faults.append(Fault(path="*-00001-of-00003.gguf", kind="drop", at=1000, times=2))
    doc = _plan_json("glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert doc["sizes_from"] == "remote-header" and not published.faults[0].times
    published.faults.append(Fault(path="*-00002-of-00003.gguf", kind="drop", at=10, times=10))
    monkeypatch.setenv("GLMLOCAL_HOME", str(Store().root) + "-2")  # an empty cache
    code, _, err = _cli("plan", "glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert code == 1 and err.count("\n") == 1 and "network failure while reading the GGUF header" in err


def test_hub_without_range_support_is_one_clear_line(published, ud_parts):
    published.ranges = False
    code, _, err = _cli("plan", "glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "ignored a byte-range request" in err and "pull the model first" in err
    assert not (Store().root / "headers" / "unsloth" / "GLM-4.6-GGUF" / "sets").exists()  # nothing cached


def test_corrupt_header_is_one_clear_line(fakehub, ud_parts, tmp_path):
    data = bytearray(ud_parts[0].read_bytes())
    (klen,) = struct.unpack_from("<Q", data, 24)
    struct.pack_into("<I", data, 24 + 8 + klen, 0xBEEF)  # the first key's value type: not a GGUF type
    bad = tmp_path / ud_parts[0].name
    bad.write_bytes(bytes(data))
    fakehub.add_repo(REPO, {f"UD-Q2_K_XL/{bad.name}": bad} | {f"UD-Q2_K_XL/{p.name}": p for p in ud_parts[1:]})
    code, _, err = _cli("plan", "glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{REPO}/UD-Q2_K_XL/{bad.name}: unknown value type" in err
    assert sum(fakehub.bytes_sent.values()) < bad.stat().st_size


def test_header_of_another_architecture_is_refused(fakehub, tmp_path):
    """A header that parses but is not glm4moe: one line naming the repository, not our cache path."""
    kv = b"general.architecture"
    val = b"llama"
    header = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(kv)) + kv + struct.pack("<I", 8)
              + struct.pack("<Q", len(val)) + val)
    header += bytes(-len(header) % 32)
    f = tmp_path / f"{STEM}-00001-of-00001.gguf"
    f.write_bytes(header + bytes(1 << 20))
    fakehub.add_repo(REPO, {f"UD-Q2_K_XL/{f.name}": f})
    code, _, err = _cli("plan", "glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert code == 2 and err.count("\n") == 1
    assert "published ud-q2_k_xl GGUF of glm-4.6 (unsloth/GLM-4.6-GGUF) has an unusable header" in err
    assert "not glm4moe" in err and str(Store().root) not in err


# ---------------------------------------------------------------------------------------------
# The no-fit hint
# ---------------------------------------------------------------------------------------------
def test_no_fit_hint_names_the_published_quant_that_fits(published, monkeypatch):
    code, _, err = _cli("plan", "glm-4.6", *BIG_BOX)  # q4_k_m from the recipe: ~216 GiB, does not fit
    assert code == 1 and err.count("\n") == 1
    assert "--quant ud-q2_k_xl fits: a published GGUF of" in err
    assert "run: glmlocal pull glm-4.6 --quant ud-q2_k_xl" in err
    # it sized the quant from its headers, now cached: the same error offline, without a request
    n = len(published.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err2 = _cli("plan", "glm-4.6", *BIG_BOX)
    assert code == 1 and err2 == err and len(published.requests) == n


def test_no_fit_hint_fetches_only_the_headers_it_needs(published, gguf_factory, tmp_path):
    """Two published quants that fit: the hint names the larger (better) one; the smaller one is never read."""
    small = split_gguf(Path(gguf_factory("tiny45", "q4_k_m", mtp=False)), tmp_path, "GLM-4.6-UD-IQ1_M", 2)
    files = {f"UD-Q2_K_XL/{p.name}": p for p in published_parts(published)}
    published.add_repo(REPO, files | {f"UD-IQ1_M/{p.name}": p for p in small})
    code, _, err = _cli("plan", "glm-4.6", *BIG_BOX)
    assert code == 1 and "--quant ud-q2_k_xl fits" in err
    assert not [r for r in published.requests if "UD-IQ1_M" in r["path"]]


def published_parts(hub) -> list[Path]:
    commit = hub.repos[REPO].refs["main"]
    return [b.path for b in hub.repos[REPO].commits[commit].values()]


def test_no_fit_hint_offline_without_cache_says_what_it_could_not_size(fakehub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _cli("plan", "glm-4.7", "--gpu-mem", "24GiB", "--ram", "128GiB")
    assert code == 1 and err.count("\n") == 1
    assert "no smaller quant fits either" not in err  # that would be untrue: published ones were not sized
    assert "ud-q2_k_xl" in err and "could not be sized" in err and "glmlocal plan glm-4.7 --quant" in err
    assert not fakehub.requests


def test_published_quants_larger_than_the_machine_are_not_fetched(published):
    """Only headers of candidates that could fit are read: a quant bigger than RAM + VRAM is skipped by size."""
    from glmlocal.plan.published import SmallerQuants

    alts = SmallerQuants(get_model("glm-4.6"), current_bytes=10**12, limit_bytes=1 << 20)  # 1 MiB machine
    assert list(alts) == []
    assert not _resolve_requests(published)
    alts = SmallerQuants(get_model("glm-4.6"), current_bytes=10**12, limit_bytes=None)
    # recipe quants all smaller than 1 TB come first by size; the published one (5 MB) last
    assert list(alts)[-1] == "ud-q2_k_xl" and alts["ud-q2_k_xl"].quant == "ud-q2_k_xl"
    assert alts.unsized and "ud-q2_k_xl" not in alts.unsized  # the others are not on this hub


# ---------------------------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------------------------
def test_pull_published_only_quant_and_refuse_from_source(published, ud_parts):
    code, _, err = _cli("pull", "glm-4.6", "--quant", "ud-q2_k_xl", "--from-source")
    assert code == 2 and err.count("\n") == 1
    assert "the converter cannot make ud-q2_k_xl" in err and "drop --from-source" in err
    code, _, err = _cli("pull", "glm-4.6-fp8", "--quant", "UD-Q2_K_XL")
    assert code == 2 and "glm-4.6-fp8 has no published ud-q2_k_xl GGUF" in err
    assert not published.requests  # both refused before touching the network
    code, _, err = _cli("pull", "glm-4.6", "--quant", "UD-Q2_K_XL")
    assert code == 0, err
    m = Store().read_manifest("glm-4.6", "ud-q2_k_xl")
    assert (m.method, m.state, m.verified) == ("gguf", "complete", True)
    assert [f.path for f in m.files] == [p.name for p in ud_parts]
    d = Store().model_dir("glm-4.6", "ud-q2_k_xl")
    assert all((d / p.name).read_bytes() == p.read_bytes() for p in ud_parts)
    code, out, _ = _cli("list")
    assert "ud-q2_k_xl" in out and "complete, verified" in out


# ---------------------------------------------------------------------------------------------
# The header cache
# ---------------------------------------------------------------------------------------------
def _set_files() -> list[Path]:
    return sorted((Store().root / "headers" / "unsloth" / "GLM-4.6-GGUF" / "sets").glob("*.json"))


def test_a_cache_in_the_old_format_or_damaged_is_fetched_again(published, ud_parts):
    first = _plan_json("glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    (index,) = _set_files()
    doc = json.loads(index.read_text())
    assert doc["format"] == 2 and [f["header"] for f in doc["files"]] == [read_gguf(p).data_offset for p in ud_parts]
    del doc["format"]  # what the sparse-file cache (format 1) wrote
    index.write_text(json.dumps(doc))
    again = _plan_json("glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert not again["remote"]["cached"] and again["remote"]["fetched_bytes"] > 0
    assert again["placement"] == first["placement"]
    # a header file damaged in place (same length): unreadable, so fetched again rather than trusted
    (index,) = _set_files()
    cached = Store().root / "headers" / "unsloth" / "GLM-4.6-GGUF" / first["remote"]["commit"]
    victim = next(cached.rglob("*-00001-of-00003.gguf"))
    victim.write_bytes(b"XXXX" + victim.read_bytes()[4:])
    third = _plan_json("glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert not third["remote"]["cached"] and third["placement"] == first["placement"]
    assert victim.read_bytes()[:4] == b"GGUF"
    assert _plan_json("glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)["remote"]["cached"]


def test_a_published_file_shorter_than_its_header_says_is_refused(fakehub, ud_parts, tmp_path):
    """The header is complete, but its tensors end past the file the hub lists: one line, nothing cached."""
    short = tmp_path / ud_parts[2].name
    short.write_bytes(ud_parts[2].read_bytes()[:-4096])
    fakehub.add_repo(REPO, {f"UD-Q2_K_XL/{p.name}": p for p in ud_parts[:2]} | {f"UD-Q2_K_XL/{short.name}": short})
    code, _, err = _cli("plan", "glm-4.6", "--quant", "ud-q2_k_xl", *CPU_8G)
    assert code == 2 and err.count("\n") == 1
    assert f"{REPO}/UD-Q2_K_XL/{short.name}: truncated (tensor" in err and "extends past end of file" in err
    assert not _set_files()
