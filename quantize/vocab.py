"""GLM tokenizer -> GGUF `tokenizer.*` keys, as llama.cpp's `_set_vocab_glm` + gguf-py `SpecialVocab`
write them, read straight from tokenizer.json / tokenizer_config.json (no transformers needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFValueType as VT
from gguf import TokenType

from quantize.errors import ConversionError

NORMAL, CONTROL, USER_DEFINED, UNUSED = TokenType.NORMAL, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNUSED
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# _set_vocab_glm's hard-coded specials; applied only where the HF files set nothing.
GLM_SPECIALS = (("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"), ("eom", "<|observation|>"))
_KEY = {"bos": "bos", "eos": "eos", "unk": "unknown", "sep": "seperator", "pad": "padding", "cls": "cls",
        "mask": "mask", "eot": "eot", "eom": "eom"}


def _looks_special(tok: str) -> bool:
    """does_token_look_special (conversion/base.py)."""
    return (tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<｜") and tok.endswith("｜>")) or (tok.startswith("<unused") and tok.endswith(">")))


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConversionError(f"missing {path.name} in {path.parent}", hint="the checkpoint needs its tokenizer") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e


def _merges(tok: dict) -> list[str]:
    merges = tok.get("model", {}).get("merges") or []
    if merges and isinstance(merges[0], list):
        # transformers >= 4.45 pair format; spaces are re-encoded as U+0120 like gguf-py does
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    return list(merges)


def tokens_and_types(tok: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """get_vocab_base: `vocab_size` entries, [PAD{i}] for holes, CONTROL/USER_DEFINED for added tokens."""
    if tok.get("model", {}).get("type") != "BPE":
        raise ConversionError("tokenizer.json is not a BPE tokenizer (GLM uses byte-level BPE)")
    reverse = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        reverse[i] = a["content"]
    if reverse and max(reverse) >= vocab_size:
        raise ConversionError(f"tokenizer has id {max(reverse)} but config vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(CONTROL if added[i].get("special") or _looks_special(reverse[i]) else USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(NORMAL)
    return tokens, types


def _special_ids(tok: dict, tcfg: dict, config: dict) -> tuple[dict[str, int], dict[str, bool]]:
    """SpecialVocab._try_load_from_tokenizer_json / _from_config_json, then the GLM hard-codes."""
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}
    pp = tok.get("post_processor")
    for proc in (pp.get("processors", [pp]) if pp else []):
        if proc.get("type") == "ByteLevel":
            add.setdefault("bos", False)
            add.setdefault("eos", False)
        elif proc.get("type") in ("TemplateProcessing", "RobertaProcessing"):
            raise ConversionError(f"unsupported tokenizer post-processor {proc.get('type')} for GLM")
    added = tok.get("added_tokens", [])
    for typ in SPECIAL_TYPES:
        if isinstance(entry := tcfg.get(f"add_{typ}_token"), bool):
            add.setdefault(typ, entry)
        entry = tcfg.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str):
            tid = next((a.get("id") for a in added if a.get("content") == content), None)
            if isinstance(tid, int):
                ids.setdefault(typ, tid)
    for typ in SPECIAL_TYPES:
        if isinstance(tid := config.get(f"{typ}_token_id"), int) and tid >= 0:
            ids.setdefault(typ, tid)
    by_content = {a["content"]: a["id"] for a in added}
    for typ, content in GLM_SPECIALS:
        if content not in by_content:
            raise ConversionError(f"tokenizer lacks GLM special token {content}")
        ids.setdefault(typ, by_content[content])
    return ids, add


def read_chat_template(src: Path, tcfg: dict) -> str | list | None:
    """SpecialVocab's chat template: tokenizer_config.json's `chat_template` (string, or a list of
    {name, template}), else chat_template.jinja (plus additional_chat_templates/*.jinja, which make it a
    list), else chat_template.json. Read only when tokenizer_config.json exists and is not empty."""
    if not tcfg:
        return None
    alt = None
    if (src / "chat_template.jinja").is_file():
        alt = (src / "chat_template.jinja").read_text(encoding="utf-8")
        # glob order (directory order), as gguf-py: it decides the order of the per-name keys
        if extra := list((src / "additional_chat_templates").glob("*.jinja")):
            alt = [{"name": "default", "template": alt}]
            alt += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
    elif (src / "chat_template.json").is_file():
        alt = _load_json(src / "chat_template.json").get("chat_template")
    tmpl = tcfg.get("chat_template", alt)
    return tmpl if isinstance(tmpl, (str, list)) else None


def chat_template_kv(tmpl: str | list | None) -> list[tuple[str, VT, Any]]:
    """GGUFWriter.add_chat_template: a list gives `tokenizer.chat_template.<name>` per named template and
    `tokenizer.chat_templates` (their names), then the `default` one as `tokenizer.chat_template`."""
    if tmpl is None or isinstance(tmpl, str):
        return [("tokenizer.chat_template", VT.STRING, tmpl)] if tmpl else []
    kv: list[tuple[str, VT, Any]] = []
    default, names = None, []
    for choice in tmpl:
        if not isinstance(choice, dict):
            continue
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(choice.get("name", "")))
        template = choice.get("template")
        if not name or template is None:
            continue
        if name == "default":
            default = template
        else:
            if name not in names:
                names.append(name)
            if template:
                kv.append((f"tokenizer.chat_template.{name}", VT.STRING, template))
    if names:
        # gguf-py lists a set here, whose order varies between runs for two or more names; sorted is stable
        kv.append(("tokenizer.chat_templates", VT.ARRAY, (VT.STRING, sorted(names))))
    if default:
        kv.append(("tokenizer.chat_template", VT.STRING, default))
    return kv


def tokenizer_kv(src: Path, config: dict) -> list[tuple[str, VT, Any]]:
    """All tokenizer.* keys in convert_hf_to_gguf.py's order. Array values are (item type, list)."""
    tok = _load_json(src / "tokenizer.json")
    tcfg = _load_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").exists() else {}
    tokens, types = tokens_and_types(tok, int(config.get("vocab_size", len(tok["model"]["vocab"]))))
    kv: list[tuple[str, VT, Any]] = [
        ("tokenizer.ggml.model", VT.STRING, "gpt2"),
        ("tokenizer.ggml.pre", VT.STRING, "glm4"),
        ("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, tokens)),
        ("tokenizer.ggml.token_type", VT.ARRAY, (VT.INT32, types)),
    ]
    if merges := _merges(tok):
        kv.append(("tokenizer.ggml.merges", VT.ARRAY, (VT.STRING, merges)))
    ids, add = _special_ids(tok, tcfg, config)
    kv += [(f"tokenizer.ggml.{_KEY[typ]}_token_id", VT.UINT32, tid) for typ, tid in ids.items()]
    kv += [(f"tokenizer.ggml.add_{typ}_token", VT.BOOL, v) for typ, v in add.items()]
    return kv + chat_template_kv(read_chat_template(src, tcfg))
