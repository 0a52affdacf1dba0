"""The store: layout, atomic manifests, free-space checks, rm, and resolving MODEL arguments."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from glmlocal.errors import DiskSpaceError, InputError
from glmlocal.models.store import (
    FileEntry,
    Manifest,
    Store,
    check_free,
    free_bytes,
    home,
    resolve_model,
    split_files,
)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("GLMLOCAL_HOME", str(tmp_path / "home"))
    return Store()


def _complete(store: Store, name: str, quant: str, files: dict[str, bytes]) -> Manifest:
    d = store.model_dir(name, quant)
    d.mkdir(parents=True)
    entries = []
    for fname, data in files.items():
        (d / fname).write_bytes(data)
        entries.append(FileEntry(fname, len(data), "0" * 64, None, True))
    m = Manifest(name, quant, "gguf", "org/repo", "a" * 40, state="complete", verified=True,
                 files=entries, gguf=sorted(files)[0])
    store.write_manifest(m)
    return m


def test_home_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMLOCAL_HOME", str(tmp_path / "x"))
    assert home() == tmp_path / "x"
    monkeypatch.delenv("GLMLOCAL_HOME")
    assert home() == Path.home() / ".cache" / "glmlocal"


def test_layout_and_manifest_roundtrip(store):
    m = _complete(store, "glm-4.6", "q4_k_m", {"a.gguf": b"GGUF1234"})
    path = store.manifest_path("glm-4.6", "q4_k_m")
    assert path == store.root / "models" / "glm-4.6" / "q4_k_m" / "manifest.json"
    assert store.read_manifest("glm-4.6", "q4_k_m") == m
    assert json.loads(path.read_text())["state"] == "complete"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # atomic write cleaned up
    assert store.manifests() == [m]
    assert store.source_dir("glm-4.6", "fp8") == store.root / "models" / "glm-4.6" / "source-fp8"
    assert Store.incomplete_path(path.parent / "a.gguf", "abc").name == "a.gguf.abc.incomplete"


def test_names_cannot_escape_the_store(store):
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(InputError):
            store.model_dir(bad, "q4_k_m")


def test_corrupt_manifest_is_a_clear_error(store):
    p = store.manifest_path("glm-4.6", "q8_0")
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    with pytest.raises(InputError, match="corrupt manifest"):
        store.read_manifest("glm-4.6", "q8_0")


def test_remove_frees_and_reports_bytes(store):
    _complete(store, "glm-4.6", "q4_k_m", {"a.gguf": b"G" * 1000})
    _complete(store, "glm-4.6", "q8_0", {"b.gguf": b"G" * 3000})
    src = store.source_dir("glm-4.6", "bf16")
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"s" * 5000)
    one = store.remove("glm-4.6", "q4_k_m")
    assert 1000 <= one < 2000 and not store.model_dir("glm-4.6", "q4_k_m").exists()
    rest = store.remove("glm-4.6")
    assert rest >= 8000 and not store.model_root("glm-4.6").exists()
    assert store.remove("glm-4.6") == 0


def test_lock_refuses_a_second_pull(store):
    with store.lock("glm-4.6", "q4_k_m"):
        with pytest.raises(InputError, match="another glmlocal pull"):
            with store.lock("glm-4.6", "q4_k_m"):
                pass
    with store.lock("glm-4.6", "q4_k_m"):  # released
        pass


def test_free_space_check(tmp_path, monkeypatch):
    real = shutil.disk_usage
    assert free_bytes(tmp_path / "not" / "yet") == real(tmp_path).free
    monkeypatch.setattr("glmlocal.models.store.shutil.disk_usage", lambda p: real(p)._replace(free=5 * 1024**3))
    check_free(tmp_path, 4 * 1024**3, "download")
    with pytest.raises(DiskSpaceError) as exc:
        check_free(tmp_path, 6 * 1024**3, "download")
    assert "need 6.00 GiB, 5.00 GiB free" in exc.value.one_line()


# ---------------------------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------------------------
def test_resolve_registry_name_not_pulled(store):
    r = resolve_model("GLM-4.6")
    assert (r.kind, r.name, r.quant, r.family, r.path) == ("registry", "glm-4.6", "q4_k_m", "glm45", None)
    with pytest.raises(InputError) as exc:
        r.require_gguf()
    assert "glmlocal pull glm-4.6 --quant q4_k_m" in exc.value.one_line()
    r = resolve_model("zai-org/GLM-4.7:Q8_0")
    assert (r.name, r.quant, r.family) == ("glm-4.7", "q8_0", "glm47")
    with pytest.raises(InputError, match="conflicting"):
        resolve_model("glm-4.7:q8_0", quant="q6_k")


def test_resolve_pulled_model_and_default_quant(store):
    _complete(store, "glm-4.5-air", "q6_k", {"air-Q6_K.gguf": b"GGUF...."})
    r = resolve_model("glm-4.5-air")  # the only complete quant is picked
    assert r.kind == "pulled" and r.quant == "q6_k" and r.path.name == "air-Q6_K.gguf"
    assert r.require_gguf() == r.path
    assert resolve_model(str(store.model_dir("glm-4.5-air", "q6_k"))).path == r.path  # the store dir itself
    half = Manifest("glm-4.5-air", "q4_k_m", "gguf", "o/r", "b" * 40)
    store.write_manifest(half)
    r = resolve_model("glm-4.5-air", quant="Q4_K_M")
    assert r.kind == "registry" and r.manifest.state == "downloading"
    with pytest.raises(InputError, match="not pulled yet \\(pull is downloading\\)"):
        r.require_gguf()


def test_resolve_unknown_name_lists_known_models(store):
    with pytest.raises(InputError) as exc:
        resolve_model("glm-5")
    line = exc.value.one_line()
    assert "unknown model 'glm-5'" in line and "glm-4.6" in line and "glm-4.5-air" in line
    with pytest.raises(InputError, match="no such file"):
        resolve_model("./missing/model.gguf")
    with pytest.raises(InputError, match="unknown quant 'q2_k'"):
        resolve_model("glm-4.6:q2_k")


def test_resolve_local_gguf_and_split_set(tmp_path, store):
    single = tmp_path / "m.gguf"
    single.write_bytes(b"GGUF" + b"\0" * 10)
    assert resolve_model(str(single)).path == single
    parts = [tmp_path / f"big-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    for p in parts:
        p.write_bytes(b"GGUF")
    assert split_files(parts[1]) == parts
    for p in parts:  # any part resolves to the first file, which llama.cpp must be given
        r = resolve_model(str(p))
        assert (r.kind, r.path) == ("gguf", parts[0])
    os.unlink(parts[2])
    with pytest.raises(InputError, match="missing 1 part.*big-00003-of-00003.gguf"):
        resolve_model(str(parts[0]))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE")
    with pytest.raises(InputError, match="not a GGUF"):
        resolve_model(str(bad))


def test_resolve_directory_of_ggufs(tmp_path, store):
    d = tmp_path / "d"
    d.mkdir()
    for i in (1, 2):
        (d / f"x-{i:05d}-of-00002.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(d)).path == d / "x-00001-of-00002.gguf"
    (d / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(InputError, match="several GGUF models"):
        resolve_model(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no GGUF file and no config.json"):
        resolve_model(str(empty))


def test_resolve_checkpoint_dir(ckpt_factory, tmp_path, store):
    ckpt = ckpt_factory("tiny")
    r = resolve_model(str(ckpt))
    assert (r.kind, r.path) == ("checkpoint", ckpt)
    with pytest.raises(InputError) as exc:
        r.require_gguf()
    assert f"run: glmlocal convert {ckpt}" in exc.value.one_line()
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(InputError, match="not a GLM-4.x MoE checkpoint"):
        resolve_model(str(other))
