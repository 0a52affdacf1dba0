"""general.* keys exactly as llama.cpp's convert_hf_to_gguf.py writes them.

A port of gguf-py's `Metadata.load` / `apply_metadata_heuristic` / `get_model_id_components` /
`set_gguf_meta_model` and conversion/base.py `prepare_metadata`: sampling defaults from
generation_config.json; license, tags, languages, base models and datasets from the YAML front matter of
README.md (the model card); name, basename, version, finetune and size label from `_name_or_path` in
config.json and from the checkpoint directory's name; the size label otherwise from the parameter count.

One deliberate difference: llama.cpp reads the directory name as given, so a Hugging Face cache snapshot
(`models--zai-org--GLM-4.6/snapshots/<commit>`) becomes a model named after the commit hash. `source_name`
lets a caller name the directory (glmlocal pull passes the repository name) and defaults to the repository
name for such snapshots, which gives exactly what llama.cpp writes for the same files in a folder named
like the repository (what `hf download --local-dir GLM-4.6` makes).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from gguf import GGUFValueType as VT

from quantize.errors import ConversionError

# generation_config.json key -> general.sampling.* key and type, in gguf-py's write order
SAMPLING = (("sequence", "sequence", VT.STRING), ("top_k", "top_k", VT.INT32), ("top_p", "top_p", VT.FLOAT32),
            ("min_p", "min_p", VT.FLOAT32), ("xtc_probability", "xtc_probability", VT.FLOAT32),
            ("xtc_threshold", "xtc_threshold", VT.FLOAT32), ("temperature", "temp", VT.FLOAT32),
            ("penalty_last_n", "penalty_last_n", VT.INT32), ("repetition_penalty", "penalty_repeat", VT.FLOAT32),
            ("mirostat", "mirostat", VT.INT32), ("mirostat_tau", "mirostat_tau", VT.FLOAT32),
            ("mirostat_eta", "mirostat_eta", VT.FLOAT32))
# Metadata attribute -> general.* key, in set_gguf_meta_model's order (license, links and lists follow)
_SCALARS = (("name", "name"), ("author", "author"), ("version", "version"), ("organization", "organization"),
            ("finetune", "finetune"), ("basename", "basename"), ("description", "description"),
            ("quantized_by", "quantized_by"), ("size_label", "size_label"))
_AFTER_LICENSE = (("license_name", "license.name"), ("license_link", "license.link"), ("url", "url"),
                  ("doi", "doi"), ("uuid", "uuid"), ("repo_url", "repo_url"), ("source_url", "source.url"),
                  ("source_doi", "source.doi"), ("source_uuid", "source.uuid"),
                  ("source_repo_url", "source.repo_url"))
_LINK_FIELDS = ("name", "author", "version", "organization", "description", "url", "doi", "uuid", "repo_url")
# model-card key -> Metadata attribute, in apply_metadata_heuristic's order (first one present wins)
_CARD_SCALARS = (("name", "name"), ("author", "author"), ("version", "version"), ("organization", "organization"),
                 ("description", "description"), ("finetune", "finetune"), ("basename", "basename"),
                 ("size_label", "size_label"), ("source_url", "url"), ("source_doi", "doi"),
                 ("source_uuid", "uuid"), ("source_repo_url", "repo_url"),
                 ("name", "model_name"), ("author", "model_author"), ("version", "model_version"),
                 ("organization", "model_organization"), ("description", "model_description"),
                 ("finetune", "model_finetune"), ("basename", "model_basename"),
                 ("size_label", "model_size_label"), ("source_url", "model_url"), ("source_doi", "model_doi"),
                 ("source_uuid", "model_uuid"), ("source_repo_url", "model_repo_url"),
                 ("author", "model_creator"), ("basename", "model_type"))
_SNAPSHOT = re.compile(r"^models--[^/]+?--(?P<name>[^/]+)$")


@dataclass
class Meta:
    """gguf-py's Metadata fields that a model card, config and directory name can fill."""

    sampling: dict[str, Any] = field(default_factory=dict)
    name: Any = None
    author: Any = None
    version: Any = None
    organization: Any = None
    finetune: Any = None
    basename: Any = None
    description: Any = None
    quantized_by: Any = None
    size_label: Any = None
    url: Any = None
    doi: Any = None
    uuid: Any = None
    repo_url: Any = None
    source_url: Any = None
    source_doi: Any = None
    source_uuid: Any = None
    source_repo_url: Any = None
    license: Any = None
    license_name: Any = None
    license_link: Any = None
    base_models: list | None = None
    tags: list | None = None
    languages: list | None = None
    datasets: list | None = None


# ---------------------------------------------------------------------------------------------- inputs

def load_model_card(src: Path) -> dict:
    """The YAML front matter of README.md, read the way gguf-py does (`---` on the first line)."""
    path = src / "README.md"
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read the model card {path}: {e}") from e
    if not lines or lines[0] != "---":
        return {}
    body = []
    for line in lines[1:]:
        if line == "---":
            break
        body.append(line)
    # gguf-py's fixes: YAML 1.1 reads a bare `no` (Norwegian) as false; tabs are not YAML indentation
    text = ("\n".join(body) + "\n").replace("- no\n", '- "no"\n').replace("\t", "  ")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConversionError(f"the model card {path} has invalid YAML front matter: {e}",
                              hint="fix or remove README.md; llama.cpp's converter refuses it too") from e
    return data if isinstance(data, dict) else {}


def _json_or_empty(path: Path, strict: bool) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        if not strict:
            return {}  # gguf-py ignores an unreadable generation_config.json
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def source_name(src_dir: Path) -> str:
    """The directory name the heuristics see: the repository's name for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<commit>`), else the directory's own name (absolute path, so `.` works)."""
    path = Path(os.path.abspath(src_dir))
    if path.parent.name == "snapshots" and (m := _SNAPSHOT.match(path.parent.parent.name)):
        return m.group("name")
    return path.name


# ---------------------------------------------------------------------------------------------- heuristics

def id_to_title(s: str) -> str:
    """gguf-py Metadata.id_to_title: capitalise words unless acronyms or versions."""
    return " ".join(w.title() if w.islower() and not re.match(r"^(v\d+(?:\.\d+)*|\d.*)$", w) else w
                    for w in s.strip().replace("-", " ").split())


def _size_part(part: str, total_params: int) -> tuple[str, set[str]]:
    """Normalise one size-like name part ("7b1" -> "7.1B"); a size far from the model's is a finetune."""
    types: set[str] = set()
    part = part.replace("_", ".")
    if part[-1].isdecimal():
        part = part[:-2] + "." + part[-1] + part[-2]
    if len(part) > 1 and part[-2].isdecimal() and part[-1] in "kmbt":
        part = part[:-1] + part[-1].upper()
    if total_params != 0:
        try:
            label_params = float(part[:-1]) * pow(1000, " KMBT".find(part[-1]))
            if (total_params < 0 and label_params < abs(total_params) // 8) or (
                    total_params > 0 and abs(label_params - total_params) > 7 * total_params // 8):
                types.add("finetune")
                part = part[:-1] + part[-1].lower()
        except ValueError:
            pass
    if not types:
        types.add("size_label")
    return part, types


def _annotate(parts: list[str], total_params: int) -> list[set[str]]:
    types: list[set[str]] = [set() for _ in parts]
    for i, part in enumerate(parts):
        if re.fullmatch(r"(v|iter)?\d+([.]\d+)*", part, re.IGNORECASE):
            types[i].add("version")
        elif re.fullmatch(r"i?q\d(_\w)*|b?fp?(16|32)", part, re.IGNORECASE):
            types[i].add("type")
            parts[i] = part.upper()
        elif i > 0 and re.fullmatch(r"(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)",
                                    part, re.IGNORECASE):
            parts[i], types[i] = _size_part(part, total_params)
        elif i > 0 and re.fullmatch(r"chat|instruct|vision|lora", part, re.IGNORECASE):
            types[i].add("type" if total_params < 0 and part.lower() == "lora" else "finetune")
    if any(c.isdecimal() for n, t in zip(parts, types) if "size_label" in t for c in n):
        for n, t in zip(parts, types):
            if "size_label" in t and all(c.isalpha() for c in n):
                t.remove("size_label")
    at_start = True
    for part, t in zip(parts, types):
        if at_start and ((not t and part[0].isalpha()) or "version" in t):
            t.add("basename")
        else:
            at_start = False
            if not t:
                t.add("finetune")
    for t in reversed(types):
        if "basename" in t and len(t) > 1:
            t.remove("basename")
        else:
            break
    return types


def model_id_components(model_id: str | None, total_params: int = 0) -> tuple:
    """gguf-py get_model_id_components: (full name, org, basename, finetune, version, size label)."""
    if model_id is None:
        return None, None, None, None, None, None
    if " " in model_id:
        return model_id, None, None, None, None, None
    org, full = model_id.split("/", 1) if "/" in model_id else (None, model_id)
    if org is not None and org[:1] == ".":
        org = None
    parts = [p for p in full.split("-") if p]
    types = _annotate(parts, total_params)

    def join(kind: str, exclude: str | None = None) -> str | None:
        return "-".join(p for p, t in zip(parts, types) if kind in t and exclude not in t) or None

    basename = join("basename")
    size_label = "-".join(dict.fromkeys(p for p, t in zip(parts, types) if "size_label" in t)) or None
    finetune, version = join("finetune"), join("version", exclude="basename")
    if size_label is None and finetune is None and version is None:
        basename = None  # too ambiguous
    return full, org, basename, finetune, version, size_label


def _apply_model_id(meta: Meta, model_id: str, total_params: int) -> None:
    full, org, basename, finetune, version, size_label = model_id_components(model_id, total_params)
    for attr, value in (("name", id_to_title(full) if full is not None else None),
                        ("organization", id_to_title(org) if org is not None else None),
                        ("basename", basename), ("finetune", finetune), ("version", version),
                        ("size_label", size_label)):
        if getattr(meta, attr) is None and value is not None:
            setattr(meta, attr, value)


def _link(entry: Any, total_params: int) -> dict | None:
    """One base_model / dataset entry: a Hugging Face id, a URL, or a dict taken as is."""
    if isinstance(entry, dict):
        return entry
    if not isinstance(entry, str):
        return None  # gguf-py logs "not in a known format" and appends an empty entry
    out: dict = {}
    model_id, is_url = entry, entry.startswith(("http://", "https://", "ssh://"))
    if is_url:
        out["repo_url"] = entry
        m = re.match(r"https?://huggingface.co/([^/]+/[^/]+)$", entry) if "huggingface.co" in entry else None
        if not m:
            return out
        model_id = m.group(1)
    full, org, _, _, version, _ = model_id_components(model_id, total_params)
    if full is not None:
        out["name"] = id_to_title(full)
    if org is not None:
        out["organization"] = id_to_title(org)
    if version is not None:
        out["version"] = version
    if not is_url and org is not None and full is not None:
        out["repo_url"] = f"https://huggingface.co/{org}/{full}"
    return out


def _links(card: dict, keys: tuple[str, str, str], total_params: int) -> list[dict]:
    value = card.get(keys[0], card.get(keys[1], card.get(keys[2])))
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
    return [{} if (e := _link(x, total_params)) is None else e for x in items]


def _apply_card(meta: Meta, card: dict, total_params: int) -> None:
    for attr, key in _CARD_SCALARS:
        if key in card and getattr(meta, attr) is None:
            setattr(meta, attr, card.get(key))
    if any(k in card for k in ("base_model", "base_models", "base_model_sources")):
        meta.base_models = _links(card, ("base_model", "base_models", "base_model_sources"), total_params)
    if any(k in card for k in ("datasets", "dataset", "dataset_sources")):
        meta.datasets = _links(card, ("datasets", "dataset", "dataset_sources"), total_params)
    for attr in ("license", "license_name", "license_link"):
        if attr in card and getattr(meta, attr) is None:
            setattr(meta, attr, card.get(attr))
    for attr, key in (("tags", "tags"), ("tags", "pipeline_tag"), ("languages", "languages"),
                      ("languages", "language")):
        value = card.get(key)
        if value is None:
            continue
        current = getattr(meta, attr) or []
        current.extend(value if isinstance(value, list) else [value] if isinstance(value, str) else [])
        setattr(meta, attr, current)


def load(src_dir: Path, total_params: int, dir_name: str | None = None) -> Meta:
    """Everything Metadata.load derives (no override file, no --model-name) for a checkpoint directory;
    `dir_name` replaces the directory's name in the heuristics (default: `source_name(src_dir)`)."""
    src = Path(src_dir)
    meta = Meta()
    _apply_card(meta, load_model_card(src), total_params)
    hf_name = _json_or_empty(src / "config.json", strict=True).get("_name_or_path")
    if isinstance(hf_name, str) and hf_name.count("/") <= 1:
        _apply_model_id(meta, hf_name, total_params)
    _apply_model_id(meta, dir_name if dir_name is not None else source_name(src), total_params)
    gen = _json_or_empty(src / "generation_config.json", strict=False)
    for src_key, key, _ in SAMPLING:
        value = gen.get("penalty_repeat", gen.get(src_key)) if key == "penalty_repeat" else gen.get(src_key)
        if value is not None:
            meta.sampling[key] = value
    return meta


# ---------------------------------------------------------------------------------------------- parameters

def parameter_count(tensors) -> tuple[int, int, int, int]:
    """GGUFWriter.get_total_parameter_count over (name, ggml shape) tensors: total, shared, per-expert
    parameters, and experts per expert tensor."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        shape = tuple(reversed(t.shape))  # gguf-py counts in numpy order
        size = math.prod(shape)
        if "_exps." in t.name and len(shape) >= 3:
            count = shape[-2 if ".bias" in t.name else -3]
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0


def rounded(n: float, min_digits: int = 2) -> str:
    """gguf-py utility.model_weight_count_rounded_notation."""
    for limit, scale, suffix in ((1e12, 1e-12, "T"), (1e9, 1e-9, "B"), (1e6, 1e-6, "M")):
        if n > limit:
            break
    else:
        scale, suffix = 1e-3, "K"
    x = n * scale
    fix = max(min_digits - len(str(round(x)).lstrip("0")), 0)
    return f"{x:.{fix}f}{suffix}"


def size_label(total: int, shared: int, expert: int, count: int) -> str:
    """gguf-py utility.size_label: `{experts}x{size}` for MoE models."""
    if count > 0:
        return f"{count}x{rounded(abs(shared) + abs(expert))}"
    return rounded(abs(total))


# ---------------------------------------------------------------------------------------------- output

def _text(value: Any) -> str:
    # gguf-py would crash writing a non-string card value (e.g. `version: 4.6` parses as a float);
    # writing its text is what the card's author meant.
    return value if isinstance(value, str) else str(value)


def _array(key: str, values: list) -> tuple[str, VT, Any]:
    """An array typed like gguf-py's GGUFValueType.get_type (str, float, bool, int); mixed or other items
    (which gguf-py refuses) are written as strings."""
    kinds = [(str, VT.STRING), (float, VT.FLOAT32), (bool, VT.BOOL), (int, VT.INT32)]
    item_type = next((vt for py, vt in kinds if isinstance(values[0], py)), None)
    if item_type is None or any(next((vt for py, vt in kinds if isinstance(v, py)), None) != item_type
                                for v in values):
        return key, VT.ARRAY, (VT.STRING, [_text(v) for v in values])
    return key, VT.ARRAY, (item_type, list(values))


def _links_kv(kind: str, entries: list[dict]) -> list[tuple[str, VT, Any]]:
    kv: list[tuple[str, VT, Any]] = [(f"general.{kind}.count", VT.UINT32, len(entries))]
    for i, entry in enumerate(entries):
        kv += [(f"general.{kind}.{i}.{f}", VT.STRING, _text(entry[f])) for f in _LINK_FIELDS
               if entry.get(f)]
    return kv


def meta_kv(meta: Meta) -> list[tuple[str, VT, Any]]:
    """set_gguf_meta_model: the keys in its order. Empty strings and lists are skipped, as gguf-py does."""
    kv: list[tuple[str, VT, Any]] = []
    for _, key, vt in SAMPLING:
        value = meta.sampling.get(key)
        if value is not None and (vt != VT.STRING or value):  # the sequence is a string: skipped when empty
            kv.append((f"general.sampling.{key}", vt, _text(value) if vt == VT.STRING else value))
    scalars = [(f"general.{key}", getattr(meta, attr)) for attr, key in _SCALARS]
    lic = meta.license
    scalars.append(("general.license", ",".join(map(_text, lic)) if isinstance(lic, list) else lic))
    scalars += [(f"general.{key}", getattr(meta, attr)) for attr, key in _AFTER_LICENSE]
    kv += [(key, VT.STRING, _text(v)) for key, v in scalars if v]  # add_string skips empty values
    if meta.base_models is not None:
        kv += _links_kv("base_model", meta.base_models)
    if meta.datasets is not None:
        kv += _links_kv("dataset", meta.datasets)
    kv += [_array(f"general.{key}", vals) for key, vals in (("tags", meta.tags), ("languages", meta.languages))
           if vals]
    return kv


def general_kv(src_dir: Path, tensors, arch: str, dir_name: str | None = None) -> list[tuple[str, VT, Any]]:
    """All general.* keys convert_hf_to_gguf.py writes before the architecture's hyperparameters:
    architecture, type, then the model metadata. `tensors` are the written tensors (name, ggml shape)."""
    total, shared, expert, count = parameter_count(tensors)
    dir_name = dir_name if dir_name is not None else source_name(Path(src_dir))
    meta = load(src_dir, total, dir_name)
    if meta.name is None:
        meta.name = dir_name
    if meta.size_label is None and total > 0:
        meta.size_label = size_label(total, shared, expert, count)
    return [("general.architecture", VT.STRING, arch), ("general.type", VT.STRING, "model"), *meta_kv(meta)]
