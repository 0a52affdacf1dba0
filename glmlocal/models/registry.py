"""The model registry: models.toml -> frozen ModelSpec, looked up by name or alias.

models.toml at the repository root is the source of truth; the package ships it as
glmlocal/models.toml (a link to the root file), which is what an installed glmlocal reads.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from glmlocal.errors import InputError

REGISTRY_PATH = Path(__file__).resolve().parent.parent / "models.toml"  # glmlocal/models.toml
QUANTS = ("q4_k_m", "q6_k", "q8_0", "bf16")  # what our converter writes; smallest first
# Other quants exist only as published GGUFs (`gguf.<quant>` in models.toml): unsloth's dynamic "UD-" mixes,
# IQ and Q2/Q3 types. Their names are whatever the registry lists; sizes come from the files' own headers.


@dataclass(frozen=True)
class HParams:
    """The config.json hyperparameters that size a GLM-4 MoE model (names as in config.json)."""

    num_hidden_layers: int
    num_nextn_predict_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    partial_rotary_factor: float
    use_qk_norm: bool
    attention_bias: bool
    routed_scaling_factor: float
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-5
    n_group: int = 1
    topk_group: int = 1
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class GgufSource:
    """A published GGUF: repository and a glob over its files (matches every split part)."""

    repo: str
    pattern: str


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `gguf` maps quant name -> published GGUF; `sources` maps bf16/fp8 -> repo."""

    name: str
    display: str
    aliases: tuple[str, ...]
    family: str
    chat: bool
    hparams: HParams
    sources: Mapping[str, str]
    prefer_source: str
    gguf: Mapping[str, GgufSource] = field(default_factory=dict)
    params_b: float = 0.0
    active_b: float = 0.0
    variant_of: str | None = None
    mtp_head_copies: bool = False  # MTP block has its own vocab-sized head/embedding (GLM-4.5)

    @property
    def source_repo(self) -> str:
        """The checkpoint repository `pull --from-source` downloads by default."""
        return self.sources[self.prefer_source]

    def published_gguf(self, quant: str) -> GgufSource | None:
        return self.gguf.get(normalize_quant(quant))

    def published_only(self) -> tuple[str, ...]:
        """Quants this model has only as published GGUFs (the converter cannot make them), file order."""
        return tuple(q for q in self.gguf if q not in QUANTS)


def canonical_quant(quant: str) -> str:
    """Spelling-insensitive key: 'Q4_K_M' / 'q4-k-m' -> 'q4_k_m'; 'UD-Q2_K_XL' / 'ud_q2_k_xl' -> 'ud-q2_k_xl'."""
    q = quant.strip().lower().replace("-", "_")
    return "ud-" + q[3:] if q.startswith("ud_") else q


def is_recipe_quant(quant: str) -> bool:
    """True for the quants our converter writes (and footprint_from_spec can size without any file)."""
    return canonical_quant(quant) in QUANTS


def published_quants() -> tuple[str, ...]:
    """Every published-only quant name any registry model lists (sorted)."""
    return tuple(sorted({q for spec in all_models() for q in spec.published_only()}))


def normalize_quant(quant: str) -> str:
    """The canonical name of a converter or published quant; unknown names raise InputError listing both."""
    q = canonical_quant(quant)
    if q not in QUANTS and q not in published_quants():
        hint = f"choose one of: {', '.join(QUANTS)}"
        if published_quants():
            hint += f"; published GGUFs only: {', '.join(published_quants())}"
        raise InputError(f"unknown quant {quant!r}", hint=hint)
    return q


def check_quant(spec: ModelSpec, quant: str, *, from_source: bool = False) -> str:
    """The canonical quant if `spec` can be had at it (published GGUF, or converted from a source checkpoint).

    Raises InputError before any network: a published-only quant (UD-Q2_K_XL, IQ*, Q3_K_M...) cannot be
    converted by us, so it needs a `gguf.<quant>` entry for this model and no --from-source.
    """
    q = normalize_quant(quant)
    if q in QUANTS:
        if not from_source and q not in spec.gguf and not spec.sources:
            raise InputError(f"{spec.name} has no {q} GGUF and no source checkpoint",
                             hint=f"choose one of: {', '.join(spec.gguf)}")
        return q
    ours = ", ".join(QUANTS)
    if from_source:
        hint = "drop --from-source to download the published file" if q in spec.gguf else f"converted quants: {ours}"
        raise InputError(f"the converter cannot make {q} (it writes {ours}); {q} exists only as a published GGUF",
                         hint=hint)
    if q not in spec.gguf:
        published = ", ".join(spec.published_only()) or "none"
        raise InputError(f"{spec.name} has no published {q} GGUF and the converter cannot make {q}",
                         hint=f"published-only quants of {spec.name}: {published}; converted: {ours}")
    return q


def _build_spec(name: str, entry: dict, entries: dict) -> ModelSpec:
    base = entries[entry["variant_of"]] if "variant_of" in entry else entry
    hp = HParams(**base["hparams"])
    gguf = {canonical_quant(q): GgufSource(**g) for q, g in entry.get("gguf", {}).items()}
    return ModelSpec(
        name=name,
        display=entry["display"],
        aliases=tuple(entry.get("aliases", ())),
        family=entry["family"],
        chat=bool(entry.get("chat", True)),
        hparams=hp,
        sources=MappingProxyType(dict(entry["sources"])),
        prefer_source=entry["prefer_source"],
        gguf=MappingProxyType(gguf),
        params_b=float(entry.get("params_b", 0)),
        active_b=float(entry.get("active_b", 0)),
        variant_of=entry.get("variant_of"),
        mtp_head_copies=bool(base.get("mtp_head_copies", False)),
    )


@lru_cache(maxsize=4)
def load_registry(path: Path = REGISTRY_PATH) -> tuple[ModelSpec, ...]:
    """Parse models.toml once; every entry becomes a frozen ModelSpec."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    entries = data["models"]
    return tuple(_build_spec(name, entry, entries) for name, entry in entries.items())


def all_models() -> tuple[ModelSpec, ...]:
    """Every registry entry, in file order."""
    return load_registry()


def _index() -> dict[str, ModelSpec]:
    idx: dict[str, ModelSpec] = {}
    for spec in all_models():
        for key in (spec.name, spec.display, *spec.aliases):
            idx[key.lower()] = spec
    return idx


def find_model(name_or_alias: str) -> ModelSpec | None:
    """The spec for a name or alias (case-insensitive, an 'hf.co/' or 'https://huggingface.co/' prefix ignored)."""
    key = name_or_alias.strip().lower()
    for prefix in ("https://huggingface.co/", "hf.co/", "huggingface.co/"):
        key = key.removeprefix(prefix)
    return _index().get(key.rstrip("/"))


def get_model(name_or_alias: str) -> ModelSpec:
    """Like find_model, but an unknown name raises unknown_model()."""
    spec = find_model(name_or_alias)
    if spec is None:
        raise unknown_model(name_or_alias)
    return spec


def did_you_mean(word: str, choices: dict[str, str]) -> str:
    """'; did you mean X?' (or 'X or Y') for a near miss among `choices` (spelling -> the name to suggest)."""
    word = word.strip().lower()
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), choices[c]) for c in choices), reverse=True)
    best = scored[0][0] if scored else 0.0
    # a typo is close (ratio >= 0.75); a second name only when it is as close as the first
    names = list(dict.fromkeys(name for ratio, name in scored if ratio >= max(0.75, best - 0.05)))[:2]
    return f"; did you mean {' or '.join(names)}?" if names else ""


def unknown_model(name: str) -> InputError:
    """The error for a name no registry model has: a near miss suggested, every known name listed."""
    spellings = {key.lower(): spec.name for spec in all_models() for key in (spec.name, spec.display, *spec.aliases)}
    known = ", ".join(s.name for s in all_models())
    return InputError(f"unknown model {name!r}{did_you_mean(name, spellings)}", hint=f"known models: {known}")


_CONFIG_DEFAULTS = {"num_nextn_predict_layers": 0, "n_shared_experts": 0, "first_k_dense_replace": 0,
                    "use_qk_norm": False, "attention_bias": False, "partial_rotary_factor": 0.5,
                    "rope_theta": 10000.0, "routed_scaling_factor": 1.0}


def spec_from_checkpoint(ckpt_dir: str | Path) -> ModelSpec:
    """A ModelSpec for a local safetensors checkpoint, from its config.json (for planning before converting)."""
    import json

    path = Path(ckpt_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if "Glm4MoeForCausalLM" not in cfg.get("architectures", []):
        raise InputError(f"{path}: not a GLM-4 MoE checkpoint (architectures={cfg.get('architectures')})")
    from quantize.fp8 import read_scheme

    read_scheme(cfg)  # planning a checkpoint the converter would refuse: the same one line `convert` gives
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    names = HParams.__dataclass_fields__
    values = {k: cfg.get(k, _CONFIG_DEFAULTS.get(k)) for k in names if k in cfg or k in _CONFIG_DEFAULTS}
    name = Path(ckpt_dir).resolve().name
    return ModelSpec(name=name, display=name, aliases=(), family="glm45", chat=True, hparams=HParams(**values),
                     sources=MappingProxyType({}), prefer_source="bf16")
