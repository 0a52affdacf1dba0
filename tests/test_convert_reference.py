"""Our converter against llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python 0.3.36 sdist).

BF16: byte-identical files. Q8_0: the same keys, values, tensors and bytes (our Q8_0 file uses the layout
`llama-quantize` writes, which orders tensors and two keys differently from the converter's own q8_0).

The checkpoints are laid out like zai-org's repositories (model card with YAML front matter,
generation_config.json with sampling defaults, chat_template.jinja) and converted from folders named like
them ("GLM-4.5-Air", "GLM-4.6-FP8"...), from a Hugging Face cache snapshot (a folder named by commit hash)
and from `glmlocal pull`, so general.name / basename / version / license / tags / languages / sampling are
all compared; variants cover community model cards, templates in tokenizer_config.json, additional named
chat templates and RoPE scaling.

The fixture tokenizer is trained at test time, so its hash is not in convert_hf_to_gguf.py's table of
known pre-tokenizers; the wrapper answers "glm4" for it, the value the table gives every GLM-4.5+ model.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quantize.convert import convert
from quantize.gguf_reader import read_gguf
from tests.fixtures.checkpoint import repo_name
from tests.llamacpp_src import llamacpp_source

pytest.importorskip("torch")

WRAPPER = textwrap.dedent("""
    import runpy, sys
    root = sys.argv[1]
    sys.path[:0] = [root, root + "/gguf-py"]
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "glm4"
    sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
    runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
""")
HASH = "3f1c9e0a7b52d4c6e8f0a1b3c5d7e9f1a2b4c6d8"


def reference_convert(src, out, outtype: str, *extra: str) -> None:
    root = llamacpp_source()
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(root), str(src), "--outtype", outtype,
                           "--outfile", str(out), *extra], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(src, outtype, *extra) -> path of convert_hf_to_gguf.py's output, memoized per source folder
    (its path, so its name, and what it links to) within the session."""
    done: dict = {}
    root = tmp_path_factory.mktemp("reference")

    def run(src: Path, outtype: str = "bf16", *extra: str) -> Path:
        key = (str(src), os.path.realpath(src), outtype, extra)
        if key not in done:
            out = root / f"ref{len(done)}.gguf"
            reference_convert(src, out, outtype, *extra)
            done[key] = out
        return done[key]

    return run


def named(ckpt: Path, parent: Path, name: str) -> Path:
    """The checkpoint under a folder called `name` (a link; general.name etc. come from the folder name)."""
    parent.mkdir(parents=True, exist_ok=True)
    link = parent / name
    if not link.exists():
        os.symlink(ckpt, link)
    return link


def linked_copy(ckpt: Path, dest: Path, *, drop: tuple[str, ...] = (), write: dict | None = None) -> Path:
    """A checkpoint folder of per-file links to `ckpt` (as a Hugging Face cache snapshot links to its blobs),
    without the files in `drop` and with the files in `write` (name -> text) written instead."""
    dest.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name not in drop and f.name not in (write or {}):
            os.symlink(f, dest / f.name)
    for name, text in (write or {}).items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(text, encoding="utf-8")
    return dest


def assert_zai_org_metadata(path: Path, name: str) -> None:
    """The file carries what a real zai-org repository gives (so the byte comparison covers it)."""
    meta = read_gguf(path).metadata
    assert meta["general.name"] == name.replace("-", " ")
    assert meta["general.license"] == "mit" and meta["general.tags"] == ["text-generation"]
    assert meta["general.languages"] == ["en", "zh"]
    assert meta["general.sampling.top_k"] == 40 and abs(meta["general.sampling.top_p"] - 0.95) < 1e-6
    assert meta["tokenizer.chat_template"].startswith("[gMASK]<sop>")
    if name.count("-") == 1:  # "GLM-4.6": basename GLM, version 4.6; longer names are "too ambiguous"
        assert meta["general.basename"] == "GLM" and meta["general.version"] == name.split("-")[1]


@pytest.mark.slow
@pytest.mark.parametrize("preset,fp8,mtp,family", [
    ("tiny", None, True, "glm45"), ("air", None, True, "glm45"), ("tiny45", None, True, "glm45"),
    ("tiny45", None, False, "glm45"), ("tiny", "block", True, "glm45"), ("tiny", "compressed-tensors", True, "glm45"),
    ("tiny", None, True, "glm47")])
def test_bf16_byte_identical_to_convert_hf_to_gguf(ckpt_factory, reference, tmp_path, preset, fp8, mtp, family):
    name = repo_name(preset, fp8, family)  # GLM-4.6, GLM-4.5-Air, GLM-4.5, GLM-4.6-FP8, GLM-4.7
    src = named(ckpt_factory(preset, fp8, family), tmp_path, name)
    ref = reference(src, "bf16", *([] if mtp else ["--no-mtp"]))
    ours = convert(src, tmp_path / "ours.gguf", quant="bf16", mtp=mtp).path
    assert filecmp.cmp(ours, ref, shallow=False)
    assert_zai_org_metadata(ref, name)


@pytest.mark.slow
def test_hf_cache_snapshot_named_after_its_repository(ckpt_factory, reference, tmp_path):
    """From `models--zai-org--GLM-4.6/snapshots/<commit>` llama.cpp names the model after the commit hash; we
    write what it writes for the same files in a folder named GLM-4.6, and its own output when asked."""
    ckpt = ckpt_factory("tiny")
    snap = linked_copy(ckpt, tmp_path / "hub" / "models--zai-org--GLM-4.6" / "snapshots" / HASH)
    ours = convert(snap, tmp_path / "ours.gguf", quant="bf16").path
    assert filecmp.cmp(ours, reference(named(ckpt, tmp_path / "by-name", "GLM-4.6")), shallow=False)
    assert_zai_org_metadata(ours, "GLM-4.6")
    as_is = convert(snap, tmp_path / "as-is.gguf", quant="bf16", source_name=HASH).path
    ref = reference(snap)
    assert filecmp.cmp(as_is, ref, shallow=False) and read_gguf(ref).metadata["general.name"] == HASH


COMMUNITY_CARD = """---
base_model:
- zai-org/GLM-4.6
- https://huggingface.co/zai-org/GLM-4.5-Air
tags:
- glm
- moe
datasets: zai-org/agentic-data-v1
license: [mit, apache-2.0]
language: en
pipeline_tag: text-generation
---
# A fine-tune
"""


def _variant(ckpt: Path, dest: Path, kind: str) -> Path:
    config = json.loads((ckpt / "config.json").read_text())
    tcfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    if kind == "community":
        # a community fine-tune: card with base models and datasets, YaRN RoPE scaling, a named extra template
        config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072,
                                  "beta_fast": 32.0, "beta_slow": 1.0}
        write = {"README.md": COMMUNITY_CARD, "config.json": json.dumps(config),
                 "additional_chat_templates/tool_use.jinja": "{{ messages[0]['content'] }}"}
        return linked_copy(ckpt, dest / "GLM-4.6-Derestricted-106B-A12B-Instruct-v1.1", write=write)
    # bare: no card, no sampling defaults, the template in tokenizer_config.json, legacy linear RoPE scaling
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    config["_name_or_path"] = "zai-org/GLM-4.5-Air"
    tcfg["chat_template"] = (ckpt / "chat_template.jinja").read_text(encoding="utf-8")
    gen = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
    write = {"config.json": json.dumps(config), "tokenizer_config.json": json.dumps(tcfg),
             "generation_config.json": json.dumps(gen)}
    return linked_copy(ckpt, dest / "glm-4.5-air-bf16", drop=("README.md", "chat_template.jinja"), write=write)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["community", "bare"])
def test_variant_checkpoints_byte_identical(ckpt_factory, reference, tmp_path, kind):
    src = _variant(ckpt_factory("tiny"), tmp_path, kind)
    ref = reference(src)
    ours = convert(src, tmp_path / "ours.gguf", quant="bf16").path
    assert filecmp.cmp(ours, ref, shallow=False)
    meta = read_gguf(ours).metadata
    if kind == "community":
        assert meta["glm4moe.rope.scaling.type"] == "yarn" and meta["general.base_model.count"] == 2
        assert meta["tokenizer.chat_templates"] == ["tool_use"] and meta["general.license"] == "mit,apache-2.0"
    else:
        assert meta["glm4moe.rope.scaling.type"] == "linear" and meta["general.name"] == "GLM 4.5 Air"
        assert "general.license" not in meta and not any(k.startswith("general.sampling") for k in meta)


@pytest.mark.slow
def test_q8_0_same_content_as_convert_hf_to_gguf(ckpt_factory, reference, tmp_path):
    src = named(ckpt_factory("air"), tmp_path, "GLM-4.5-Air")
    ref = reference(src, "q8_0")
    ours = convert(src, tmp_path / "ours.gguf", quant="q8_0").path
    a, b = read_gguf(ours), read_gguf(ref)
    assert a.metadata == b.metadata and a.types == b.types
    assert sorted((t.name, t.ggml_type, t.shape) for t in a.tensors) == sorted(
        (t.name, t.ggml_type, t.shape) for t in b.tensors)
    for t in b.tensors:
        assert a.tensor_bytes(t.name) == b.tensor_bytes(t.name), t.name
    assert_zai_org_metadata(ref, "GLM-4.5-Air")


@pytest.mark.slow
def test_pull_from_source_equals_converting_the_repository_by_hand(fakehub, ckpt_factory, reference, tmp_path):
    """`glmlocal pull --from-source` downloads the model card too and names the model after the repository:
    its BF16 file is byte-identical to convert_hf_to_gguf.py run on a clone of the repository."""
    from glmlocal.models.pull import pull
    from glmlocal.models.store import resolve_model

    ckpt = ckpt_factory("tiny")
    fakehub.add_dir("zai-org/GLM-4.6", ckpt)
    pull("glm-4.6", "bf16", from_source=True, threads=2)
    pulled = resolve_model("glm-4.6:bf16").require_gguf()
    clone = tmp_path / "clone" / "GLM-4.6"
    shutil.copytree(ckpt, clone, ignore=shutil.ignore_patterns(".*"))
    assert filecmp.cmp(pulled, reference(clone), shallow=False)
    assert_zai_org_metadata(pulled, "GLM-4.6")
