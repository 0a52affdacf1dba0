"""Converted GGUFs against the reference: llama.cpp logits vs transformers logits (mean KL per token),
llama.cpp tokenization vs the HF tokenizer, and the three end-of-generation tokens.

llama.cpp runs in a subprocess so a crash in the native code fails one test instead of the session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import llama_cpp
    req = json.load(open(sys.argv[1]))
    llm = llama_cpp.Llama(model_path=req["model"], n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    out = {"tokens": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in req["texts"]],
           "eog": {str(i): bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), i))
                   for i in req["eog_ids"]},
           "stops": {}}
    for i, ids in enumerate(req["prompts"]):
        llm.reset(); llm.eval(ids)
        np.save(req["out"] + f"/logits{i}.npy", np.array(llm.scores[: len(ids)], dtype=np.float32))
    for i in req["eog_ids"]:
        r = llm.create_completion("[gMASK]<sop>hi", max_tokens=8, temperature=0.0, logit_bias={i: 100.0})
        out["stops"][str(i)] = [r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]]
    print("RESULT" + json.dumps(out))
""")


def run_probe(tmp_path, model, texts=(), prompts=(), eog_ids=()):
    req = {"model": str(model), "texts": list(texts), "prompts": [list(map(int, p)) for p in prompts],
           "eog_ids": list(eog_ids), "out": str(tmp_path)}
    (tmp_path / "req.json").write_text(json.dumps(req))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "req.json")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"llama.cpp probe crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    res["logits"] = [np.load(tmp_path / f"logits{i}.npy") for i in range(len(prompts))]
    return res


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(ours))."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


TEXTS = [
    "Hello, world! How are you today?",
    "def add(a, b):\n    return a + b  # sum\n\n\tclass X: pass",
    "你好，世界！这是一个测试。日本語のテキストも。",
    "emoji 🎉🚀 and accents: café naïve",
    "    leading spaces,\n\n\n   trailing   \t  ",
    "numbers 1234567 3.14159 and 'quotes' don't won't",
]


def prompts_for(tok) -> list[list[int]]:
    ids = [tok.encode(t, add_special_tokens=False) for t in TEXTS[:4]]
    gmask, sop = tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("<sop>")
    return [[gmask, sop] + x[:40] for x in ids]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "air"])
@pytest.mark.parametrize("quant,limit", [("bf16", 5e-3), ("q8_0", 2e-2)])
def test_logits_match_transformers(gguf_factory, ckpt_factory, tmp_path, preset, quant, limit):
    from tests.fixtures.reference import hf_logits, hf_tokenizer

    ckpt = ckpt_factory(preset)
    prompts = prompts_for(hf_tokenizer(ckpt))
    res = run_probe(tmp_path, gguf_factory(preset, quant), prompts=prompts)
    kls = [mean_kl(hf_logits(ckpt, p), got) for p, got in zip(prompts, res["logits"])]
    assert max(kls) < limit, kls


def test_tokenization_matches_hf_including_specials(gguf_factory, tiny_ckpt, tmp_path):
    from tests.fixtures.reference import hf_tokenizer

    tok = hf_tokenizer(tiny_ckpt)
    specials = [t.content for t in tok.added_tokens_decoder.values()]
    texts = TEXTS + specials + ["[gMASK]<sop><|system|>\nsys<|user|>\nhi<|assistant|>\n<think>x</think>ok"]
    res = run_probe(tmp_path, gguf_factory("tiny", "q8_0"), texts=texts)
    for text, got in zip(texts, res["tokens"]):
        assert got == tok.encode(text, add_special_tokens=False), text
    assert len(specials) >= 18


def test_generation_stops_on_all_three_eog_tokens(gguf_factory, tiny_ckpt, tmp_path):
    from tests.fixtures.reference import hf_tokenizer

    tok = hf_tokenizer(tiny_ckpt)
    eog = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert json.loads((tiny_ckpt / "generation_config.json").read_text())["eos_token_id"] == eog
    not_eog = tok.convert_tokens_to_ids("<|assistant|>")
    res = run_probe(tmp_path, gguf_factory("tiny", "q4_k_m"), eog_ids=eog + [not_eog])
    assert all(res["eog"][str(i)] for i in eog) and not res["eog"][str(not_eog)]
    for i in eog:
        assert res["stops"][str(i)] == ["stop", 0], i  # forced EOG token ends generation at once
    assert res["stops"][str(not_eog)] == ["length", 8]
