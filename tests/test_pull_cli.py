"""End to end through the CLI against the fake hub: the source -> convert path with real fixture checkpoints,
a published split GGUF built from a real converted fixture and loaded by llama.cpp from its first file, list/rm,
and one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from glmlocal.cli.app import app
from glmlocal.models.store import Store, resolve_model
from tests.fakehub import Fault, split_gguf

runner = CliRunner()




def _cli(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="session")
def tiny_gguf(gguf_factory) -> Path:
    """A real converted tiny GLM GGUF (helper B's fixture). BF16: the split loader does not depend on the type."""
    return Path(gguf_factory("tiny", "bf16"))


# ---------------------------------------------------------------------------------------------
# Path B: source checkpoint -> converter
# ---------------------------------------------------------------------------------------------
def test_pull_from_source_prefers_fp8_and_matches_direct_conversion(fakehub, ckpt_factory, tmp_path):
    from quantize.convert import convert

    bf16, fp8 = ckpt_factory("tiny"), ckpt_factory("tiny", fp8="block")
    fakehub.add_dir("zai-org/GLM-4.6", bf16)
    fakehub.add_dir("zai-org/GLM-4.6-FP8", fp8)
    code, out, err = _cli("pull", "glm-4.6", "--quant", "q4_k_m", "--from-source")
    assert code == 0, err
    store = Store()
    m = store.read_manifest("glm-4.6", "q4_k_m")
    assert (m.method, m.state, m.verified, m.source["dtype"]) == ("convert", "complete", True, "fp8")
    served = {path: n for (repo, path), n in fakehub.bytes_sent.items() if repo == "zai-org/GLM-4.6-FP8"}
    assert served == {p.name: p.stat().st_size for p in fp8.iterdir() if not p.name.startswith(".")}
    assert not any(repo == "zai-org/GLM-4.6" for repo, _ in fakehub.bytes_sent)  # BF16 never downloaded
    assert not store.source_dir("glm-4.6", "fp8").exists()  # source deleted without --keep-source
    # the same conversion run by hand on a folder named like the repository (general.name comes from it)
    local = tmp_path / "GLM-4.6-FP8"
    shutil.copytree(fp8, local, ignore=shutil.ignore_patterns(".*"))
    ref = convert(local, tmp_path / "ref.gguf", quant="q4_k_m", threads=2)
    pulled = resolve_model("glm-4.6:q4_k_m").require_gguf()
    assert pulled.read_bytes() == ref.path.read_bytes()
    assert "deleted the source checkpoint" in err and "done" in err


def test_pull_from_source_uses_the_bf16_repo_when_a_mirror_lacks_the_fp8_one(fakehub, ckpt_factory):
    fakehub.add_dir("zai-org/GLM-4.6", ckpt_factory("tiny"))  # no zai-org/GLM-4.6-FP8 on this hub
    code, out, err = _cli("pull", "glm-4.6", "--quant", "q6_k", "--from-source")
    assert code == 0, err
    assert Store().read_manifest("glm-4.6", "q6_k").source["dtype"] == "bf16"
    assert {repo for repo, _ in fakehub.bytes_sent} == {"zai-org/GLM-4.6"}
    # asked for explicitly, the missing repository is still an error
    code, _, err = _cli("pull", "glm-4.6", "--quant", "q4_k_m", "--from-source", "--source", "fp8")
    assert code != 0 and "repository zai-org/GLM-4.6-FP8 not found" in err


def test_pull_without_published_gguf_converts_bf16_and_keeps_source(fakehub, ckpt_factory):
    bf16 = ckpt_factory("tiny")
    fakehub.add_dir("zai-org/GLM-4.5-Air-Base", bf16)  # glm-4.5-air-base: no published GGUF in models.toml
    code, out, err = _cli("pull", "glm-4.5-air-base", "--quant", "q8_0", "--keep-source")
    assert code == 0, err
    store = Store()
    assert store.read_manifest("glm-4.5-air-base", "q8_0").source["dtype"] == "bf16"
    src = store.read_manifest("glm-4.5-air-base", "source-bf16")
    assert src.state == "complete" and src.verified and store.source_dir("glm-4.5-air-base", "bf16").is_dir()
    code, out, _ = _cli("list")
    assert code == 0 and "source-bf16" in out and "q8_0" in out and "complete, verified" in out
    # a second quant converts from the kept source without downloading it again
    before = sum(fakehub.bytes_sent.values())
    code, _, err = _cli("pull", "glm-4.5-air-base", "--quant", "bf16", "--keep-source")
    assert code == 0, err
    assert sum(fakehub.bytes_sent.values()) == before
    assert Store().read_manifest("glm-4.5-air-base", "bf16").state == "complete"
    code, out, _ = _cli("rm", "glm-4.5-air-base")
    assert code == 0 and "freed" in out and not store.model_root("glm-4.5-air-base").exists()


def test_source_preflight_counts_conversion_output(fakehub, ckpt_factory, monkeypatch):
    import shutil

    bf16 = ckpt_factory("tiny")
    fakehub.add_dir("zai-org/GLM-4.5-Air-Base", bf16)
    download = sum(p.stat().st_size for p in bf16.iterdir() if not p.name.startswith("."))
    real = shutil.disk_usage
    monkeypatch.setattr("glmlocal.models.store.shutil.disk_usage", lambda p: real(p)._replace(free=download + 1000))
    code, _, err = _cli("pull", "glm-4.5-air-base", "--quant", "bf16")
    assert code == 1 and err.count("\n") == 1
    assert "error: not enough disk space for glm-4.5-air-base bf16" in err and "GiB free" in err
    assert not [r for r in fakehub.requests if "/resolve/" in r["path"]]


# ---------------------------------------------------------------------------------------------
# Path A with a real split GGUF, loaded by llama.cpp from the first file
# ---------------------------------------------------------------------------------------------
_LOGITS = """
import sys, numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, n_batch=16, logits_all=True, verbose=False)
tokens = [int(t) for t in sys.argv[3].split(",")]
llm.eval(tokens)
np.save(sys.argv[2], np.array(llm.scores[: len(tokens)], dtype=np.float32))
"""


def _logits(path: Path, tokens: list[int], out: Path) -> np.ndarray:
    """llama.cpp logits, in a subprocess so a native crash fails this test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-c", _LOGITS, str(path), str(out), ",".join(map(str, tokens))],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"llama.cpp failed on {path.name} (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return np.load(out)


def test_pulled_split_gguf_loads_from_first_file(fakehub, tiny_gguf, tmp_path, monkeypatch):
    parts = split_gguf(tiny_gguf, tmp_path, "GLM-4.6-Q4_K_M", 3)
    from quantize.gguf_reader import read_gguf

    meta = [read_gguf(p).metadata for p in parts]
    assert [(m["split.no"], m["split.count"]) for m in meta] == [(0, 3), (1, 3), (2, 3)]
    assert meta[0]["split.tensors.count"] == len(read_gguf(tiny_gguf).tensors)
    assert "general.architecture" in meta[0] and "general.architecture" not in meta[1]
    fakehub.add_repo("unsloth/GLM-4.6-GGUF", {f"Q4_K_M/{p.name}": p for p in parts})
    monkeypatch.setattr("glmlocal.models.hub.DEFAULT_RETRY_WAIT", 0.0)
    fakehub.faults.append(Fault(path="*-00002-of-00003.gguf", kind="drop", at=1000, times=4))  # > 3 retries
    code, _, err = _cli("pull", "glm-4.6")
    last = err.strip().splitlines()[-1]  # progress lines above it, then exactly one error line
    assert code == 1 and err.count("error:") == 1 and last.startswith("error: network failure")
    assert last.endswith("(run the same command again to resume)")
    code, out, _ = _cli("list")
    assert "downloading" in out and "resume: glmlocal pull glm-4.6 --quant q4_k_m" in out
    code, _, err = _cli("pull", "glm-4.6", "--quant", "q4_k_m")
    assert code == 0, err
    first = resolve_model("glm-4.6").require_gguf()
    assert first.name == "GLM-4.6-Q4_K_M-00001-of-00003.gguf"
    tokens = [1, 5, 9, 13, 42, 7]
    split_logits = _logits(first, tokens, tmp_path / "split.npy")
    np.testing.assert_array_equal(split_logits, _logits(tiny_gguf, tokens, tmp_path / "whole.npy"))
    n_vocab = len(read_gguf(tiny_gguf).metadata["tokenizer.ggml.tokens"])
    assert split_logits.shape == (len(tokens), n_vocab) and np.isfinite(split_logits).all()
    assert split_logits.std() > 0  # a real forward pass, not a zero buffer


# ---------------------------------------------------------------------------------------------
# CLI: list / rm / one-line errors
# ---------------------------------------------------------------------------------------------
def test_cli_errors_are_one_line(fakehub):
    cases = [
        (["pull", "glm-9"], "error: unknown model 'glm-9' (known models: glm-4.5,"),
        (["pull", "glm-4.6", "--quant", "q3"],
         "error: unknown quant 'q3' (choose one of: q4_k_m, q6_k, q8_0, bf16; published GGUFs only: q3_k_m, ud-iq1_m"),
        (["pull", "glm-4.6"], "error: repository unsloth/GLM-4.6-GGUF not found"),
        (["pull", "glm-4.6", "--from-source", "--source", "int4"], "error: glm-4.6 has no int4 source"),
        (["rm", "glm-4.6"], "error: glm-4.6 is not in the store"),
    ]
    for args, expected in cases:
        code, out, err = _cli(*args)
        assert code != 0 and err.startswith(expected) and err.count("\n") == 1, (args, err)
        assert "Traceback" not in out + err
    fakehub.add_repo("unsloth/GLM-4.6-GGUF", {"Q4_K_M/GLM-4.6-Q4_K_M-00001-of-00001.gguf": b"GGUF" * 100}, gated=True)
    code, _, err = _cli("pull", "glm-4.6")
    assert code == 1 and "gated repository and no Hugging Face token is set" in err and "HF_TOKEN" in err


def test_cli_list_and_rm(fakehub):
    fakehub.add_repo("unsloth/GLM-4.7-GGUF", {"Q6_K/GLM-4.7-Q6_K-00001-of-00001.gguf": b"GGUF" + os.urandom(50_000)})
    code, out, _ = _cli("list")
    assert code == 0 and "no models" in out
    code, _, err = _cli("pull", "glm-4.7", "-q", "Q6_K")
    assert code == 0, err
    code, out, _ = _cli("list")
    assert "glm-4.7" in out and "q6_k" in out and "complete, verified" in out and "48.83 KiB" in out
    code, out, _ = _cli("rm", "GLM-4.7", "--quant", "q6_k")
    assert code == 0 and "removed glm-4.7 q6_k: freed" in out
    assert not Store().model_dir("glm-4.7", "q6_k").exists()


def test_failed_conversion_keeps_the_downloaded_source(fakehub, ckpt_factory, monkeypatch):
    import quantize.convert
    from glmlocal.errors import ConversionError
    from glmlocal.models.pull import pull

    fakehub.add_dir("zai-org/GLM-4.5-Air-Base", ckpt_factory("tiny"))
    real = quantize.convert.convert

    def broken(*a, **kw):
        raise ConversionError("simulated converter failure")

    monkeypatch.setattr(quantize.convert, "convert", broken)
    with pytest.raises(ConversionError):
        pull("glm-4.5-air-base", "q8_0")
    store = Store()
    assert store.read_manifest("glm-4.5-air-base", "q8_0").state == "converting"
    assert store.read_manifest("glm-4.5-air-base", "source-bf16").state == "complete"
    assert not list(store.model_dir("glm-4.5-air-base", "q8_0").glob("*.gguf"))
    fetched = sum(fakehub.bytes_sent.values())
    monkeypatch.setattr(quantize.convert, "convert", real)
    m = pull("glm-4.5-air-base", "q8_0")
    assert m.state == "complete" and sum(fakehub.bytes_sent.values()) == fetched  # nothing downloaded again
    assert not store.source_dir("glm-4.5-air-base", "bf16").exists()


def test_list_shows_how_to_resume_an_interrupted_conversion_pull(fakehub, ckpt_factory, monkeypatch):
    monkeypatch.setattr("glmlocal.models.hub.DEFAULT_RETRY_WAIT", 0.0)
    fakehub.add_dir("zai-org/GLM-4.6", ckpt_factory("tiny"))
    fakehub.faults.append(Fault(path="model-00002-of-00003.safetensors", kind="drop", at=10_000, times=4))  # 1 try + 3 retries
    code, _, err = _cli("pull", "glm-4.6", "-q", "q8_0", "--from-source", "--keep-source")
    assert code == 1 and "network failure" in err
    code, out, _ = _cli("list")
    assert "resume: glmlocal pull glm-4.6 --quant q8_0 --from-source --source bf16 --keep-source" in out, out
    assert "source-bf16" in out and "source checkpoint for a conversion" in out
    code, _, err = _cli("pull", "glm-4.6", "-q", "q8_0", "--from-source", "--keep-source")
    assert code == 0, err
    code, out, _ = _cli("list")
    assert out.count("complete, verified") == 2 and "resume:" not in out


# ---------------------------------------------------------------------------------------------
# The progress view
# ---------------------------------------------------------------------------------------------
def test_pull_view_shows_every_pull_event_and_refuses_an_unknown_one(tmp_path):
    """Each event pull() emits has a handler (looked up by class, so a renamed event cannot go quiet)."""
    from io import StringIO

    from rich.console import Console

    from glmlocal.cli.pull import PullView
    from glmlocal.models import hub
    from glmlocal.models import pull as pull_mod
    from glmlocal.models.store import Manifest
    from quantize.convert import ConvertProgress

    out = StringIO()
    m = Manifest("glm-4.6", "q4_k_m", "convert", "zai-org/GLM-4.6", "c0ffee" * 7)
    events = [pull_mod.PullStarted("glm-4.6", "q4_k_m", "source", "zai-org/GLM-4.6", "c0ffee" * 7, 1, 2048, 0),
              hub.FileStarted("model.safetensors", 2048, 0),
              hub.FileProgress("model.safetensors", 1024, 2048, 1024, 2048, 1e6, 1.0),
              hub.FileRetry("model.safetensors", "connection lost at 1,024 bytes, resuming (retry 1/3)"),
              hub.FileDone("model.safetensors", 2048, "resumed"),
              pull_mod.ConvertStarted(tmp_path / "src", tmp_path / "out.gguf", "bf16"),
              pull_mod.ConvertEvent(ConvertProgress(512, 1024, "token_embd.weight", 1.0)),
              pull_mod.SourceDeleted(tmp_path / "src", 2048),
              pull_mod.PullDone(m, tmp_path / "out.gguf", 2048, 2.0)]
    with PullView(Console(file=out, width=200)) as view:
        for ev in events:
            view(ev)
        with pytest.raises(TypeError, match="PullView has no handler for builtins.object"):
            view(object())
    text = out.getvalue()
    for line in ("glm-4.6 q4_k_m: source checkpoint zai-org/GLM-4.6@c0ffeec0ffee, 1 file(s), 2.00 KiB",
                 "model.safetensors: connection lost at 1,024 bytes, resuming (retry 1/3)",
                 "model.safetensors: 2.00 KiB resumed, verified", "converting bf16 checkpoint -> out.gguf",
                 "deleted the source checkpoint (2.00 KiB)", f"done: {tmp_path / 'out.gguf'} (fetched 2.00 KiB"):
        assert line in text, (line, text)
