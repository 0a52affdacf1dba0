"""Shared fixtures. Checkpoints and GGUFs are built once per source revision (see tests/cache.py)."""

from __future__ import annotations

import os

# Keep torch / llama.cpp from oversubscribing the 2-core CI machine when several things run.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- checkpoint fixtures (owner: fixtures) ---------------------------------------------------------
import pytest

from tests.cache import REPO, cached_dir

# Every fixture module but the trained fixture's (their own key below): editing those rebuilds nothing else.
CKPT_SOURCES = [str(p.relative_to(REPO)) for p in sorted((REPO / "tests/fixtures").glob("*.py"))
                if not p.name.startswith("trained")] + ["glmlocal/templates/*.jinja"]


def _fresh(build):
    """Refuse to fill the cache from builder code older than the sources its key is hashed from."""
    from tests.fixtures import checkpoint

    def run(d):
        if checkpoint.SOURCE_HASH_AT_IMPORT != checkpoint._sources_hash():
            raise RuntimeError("tests/fixtures changed while this test process ran; rerun the tests")
        build(d)

    return run


def build_cached_checkpoint(preset: str, fp8: str | None = None, family: str = "glm45"):
    """Path of the cached random checkpoint (built on first use; see tests/fixtures/checkpoint.py)."""
    from tests.fixtures.checkpoint import build_checkpoint

    name = f"ckpt-{preset}-{fp8 or 'bf16'}-{family}"
    return cached_dir(name, CKPT_SOURCES, _fresh(lambda d: build_checkpoint(d, preset, fp8=fp8, family=family)))


def build_cached_fp8_twin(preset: str, fp8: str, family: str = "glm45"):
    """Path of the BF16 checkpoint exactly equal to the dequantized FP8 one (FP8 == BF16 tests)."""
    from tests.fixtures.fp8 import equivalent_bf16

    src = build_cached_checkpoint(preset, fp8, family)
    return cached_dir(f"ckpt-{preset}-{fp8}-bf16twin-{family}", CKPT_SOURCES, _fresh(lambda d: equivalent_bf16(src, d)))


@pytest.fixture(scope="session")
def ckpt_factory():
    """Callable (preset, fp8=None, family="glm45") -> Path of a cached fixture checkpoint."""
    return build_cached_checkpoint


@pytest.fixture(scope="session")
def fp8_twin_factory():
    """Callable (preset, fp8, family="glm45") -> Path of the FP8 checkpoint's exact BF16 twin."""
    return build_cached_fp8_twin


@pytest.fixture(scope="session")
def tiny_ckpt():
    """GLM-4.6-layout tiny checkpoint (q/k norm, NextN layer without head/embeddings)."""
    return build_cached_checkpoint("tiny")


@pytest.fixture(scope="session")
def air_ckpt():
    """GLM-4.5-Air-layout checkpoint (no q/k norm, FFN rows not divisible by 256)."""
    return build_cached_checkpoint("air")
# ---- end checkpoint fixtures -----------------------------------------------------------------------


# ---- converter fixtures (owner: converter) ---------------------------------------------------------
GGUF_SOURCES = CKPT_SOURCES + ["quantize/*.py"]


def build_cached_gguf(preset: str, quant: str, mtp: bool = True, family: str = "glm45", fp8: str | None = None):
    """Path of a cached GGUF converted by quantize.convert from the cached fixture checkpoint, named (general.name,
    basename, version) after the zai-org repository the fixture imitates, as a conversion of that repository is."""
    from quantize.convert import convert
    from tests.fixtures.checkpoint import repo_name

    src = build_cached_checkpoint(preset, fp8, family)
    name = f"gguf-{preset}-{fp8 or 'bf16'}-{family}-{quant}-{'mtp' if mtp else 'nomtp'}"
    d = cached_dir(name, GGUF_SOURCES, lambda d: convert(src, d / "model.gguf", quant=quant, mtp=mtp,
                                                         source_name=repo_name(preset, fp8, family)))
    return d / "model.gguf"


@pytest.fixture(scope="session")
def gguf_factory():
    """Callable (preset, quant, mtp=True, family="glm45", fp8=None) -> Path of a cached converted GGUF."""
    return build_cached_gguf
# ---- end converter fixtures ------------------------------------------------------------------------


# ---- fake hub (owner: pull) ----------------------------------------------------------------------------
@pytest.fixture
def fakehub(tmp_path, monkeypatch):
    """A running fake hub with HF_ENDPOINT pointing at it and an empty store / HF cache / no token."""
    from tests.fakehub import FakeHub

    monkeypatch.setenv("GLMLOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


# ---- F32 fixtures (owner: batch) --------------------------------------------------------------------
def build_cached_f32_gguf(preset: str, family: str = "glm45"):
    """Path of an F32 copy of the cached BF16 GGUF (llama_model_quantize, LLAMA_FTYPE_ALL_F32; the NextN block
    is kept). llama.cpp's CPU kernels give bit-identical rows for F32 weights whatever the batch shape, so
    tests that compare a batched decode with a solo one token for token use these (bf16 and q4 matmuls take
    other paths for 1 row and n rows, which can flip a near-tie)."""
    import llama_cpp.llama_cpp as C

    src = build_cached_gguf(preset, "bf16", family=family)

    def build(d):
        qp = C.llama_model_quantize_default_params()
        qp.ftype = 0  # LLAMA_FTYPE_ALL_F32
        qp.nthread = 2
        rc = C.llama_model_quantize(str(src).encode(), str(d / "model.gguf").encode(), qp)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to F32 failed ({rc})")

    return cached_dir(f"gguf-{preset}-{family}-f32", GGUF_SOURCES, build) / "model.gguf"


@pytest.fixture(scope="session")
def f32_gguf_factory():
    """Callable (preset, family="glm45") -> Path of a cached F32 GGUF."""
    return build_cached_f32_gguf
# ---- end F32 fixtures --------------------------------------------------------------------------------


# ---- trained fixtures (owner: spec) ------------------------------------------------------------------
TRAINED_SOURCES = ["tests/fixtures/trained.py", "tests/fixtures/trained_corpus.py", "tests/fixtures/checkpoint.py",
                   "tests/fixtures/tokenizer.py", "glmlocal/templates/*.jinja"]


def build_cached_trained_checkpoint(layout: str = "tiny45"):
    """Path of the trained tiny checkpoint (tests/fixtures/trained.py: a trunk that learnt a few standard-library
    modules and a NextN head trained for t+2; 4-7 CPU minutes on first use). Keyed by its sources and by the
    digest of the standard-library text it learns, which changes with the Python version."""
    from tests.fixtures.trained import build_trained_checkpoint, corpus_digest

    return cached_dir(f"ckpt-trained-{layout}-{corpus_digest()}", TRAINED_SOURCES,
                      lambda d: build_trained_checkpoint(d, layout))


def build_cached_trained_gguf(layout: str = "tiny45", quant: str = "bf16"):
    """Path of the trained checkpoint converted by quantize.convert (NextN kept); quant "f32" is an F32 copy of
    the BF16 GGUF (llama_model_quantize), whose CPU rows do not depend on the batch shape."""
    from quantize.convert import convert
    from tests.fixtures.checkpoint import repo_name

    src = build_cached_trained_checkpoint(layout)
    if quant == "f32":
        bf16 = build_cached_trained_gguf(layout, "bf16")
        return cached_dir(f"gguf-trained-{layout}-f32", TRAINED_SOURCES + ["quantize/*.py"],
                          lambda d: _f32_copy(bf16, d / "model.gguf")) / "model.gguf"
    d = cached_dir(f"gguf-trained-{layout}-{quant}", TRAINED_SOURCES + ["quantize/*.py"],
                   lambda d: convert(src, d / "model.gguf", quant=quant, mtp=True,
                                     source_name=repo_name(layout, None, "glm45")))
    return d / "model.gguf"


def _f32_copy(src, dst) -> None:
    import llama_cpp.llama_cpp as C

    qp = C.llama_model_quantize_default_params()
    qp.ftype, qp.nthread = 0, 2  # LLAMA_FTYPE_ALL_F32
    if C.llama_model_quantize(str(src).encode(), str(dst).encode(), qp) != 0:
        raise RuntimeError(f"llama_model_quantize to F32 failed for {src}")


@pytest.fixture(scope="session")
def trained_factory():
    """Callable (layout="tiny45", quant="bf16") -> Path of a cached trained GGUF ("f32" for an F32 copy)."""
    return build_cached_trained_gguf
# ---- end trained fixtures ----------------------------------------------------------------------------
