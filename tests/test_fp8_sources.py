"""`pull --from-source` and `plan` read an FP8 checkpoint's scheme as the converter does (quantize.fp8.read_scheme):
an FP8 repository whose scheme the converter refuses is not downloaded (its config.json alone is read), the BF16
one is converted instead unless --source asked for FP8; `plan` on such a checkpoint gives convert's one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from glmlocal.cli.app import app
from glmlocal.models.store import Store
from tests.test_convert_errors import clone

REFUSED = "compressed-tensors format 'pack-quantized' is not supported, expected 'float-quantized'"


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _pack_quantized(ckpt: Path, dest: Path) -> Path:
    """A copy of an FP8 checkpoint whose config.json declares a compressed-tensors format we do not read."""
    src = clone(ckpt, dest)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["format"] = "pack-quantized"
    (src / "config.json").write_text(json.dumps(config, indent=2))
    return src


def test_pull_passes_over_an_fp8_repository_the_converter_refuses(fakehub, ckpt_factory, tmp_path):
    fp8 = _pack_quantized(ckpt_factory("tiny", "compressed-tensors"), tmp_path / "fp8")
    fakehub.add_dir("zai-org/GLM-4.6", ckpt_factory("tiny"))
    fakehub.add_dir("zai-org/GLM-4.6-FP8", fp8)
    code, _, err = _cli("pull", "glm-4.6", "--quant", "q4_k_m", "--from-source", "--source", "fp8")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and REFUSED in lines[0], err
    fp8_served = {path for (repo, path), n in fakehub.bytes_sent.items() if repo == "zai-org/GLM-4.6-FP8" and n}
    assert fp8_served == {"config.json"}  # no weight downloaded, nothing left in the store
    assert Store().read_manifest("glm-4.6", "source-fp8") is None
    assert not Store().source_dir("glm-4.6", "fp8").exists()
    # chosen automatically (FP8 would be the smaller download), the BF16 repository is converted instead
    code, _, err = _cli("pull", "glm-4.6", "--quant", "q4_k_m", "--from-source")
    assert code == 0, err
    assert Store().read_manifest("glm-4.6", "q4_k_m").source["dtype"] == "bf16"
    fp8_served = {path for (repo, path), n in fakehub.bytes_sent.items() if repo == "zai-org/GLM-4.6-FP8" and n}
    assert fp8_served == {"config.json"}


def test_pull_fp8_source_reads_config_once_and_a_kept_copy_from_disk(fakehub, ckpt_factory, tmp_path):
    """A 96x128-block FP8 repository: config.json is fetched once (read, then put in place for the download);
    a second quant from the kept source fetches nothing; both equal converting the repository by hand."""
    from quantize.convert import convert

    fp8 = ckpt_factory("tiny", "fp8-96x128")
    fakehub.add_dir("zai-org/GLM-4.6-FP8", fp8)
    code, _, err = _cli("pull", "glm-4.6-fp8", "--quant", "q4_k_m", "--from-source", "--keep-source")
    assert code == 0, err
    served = {path: n for (repo, path), n in fakehub.bytes_sent.items() if repo == "zai-org/GLM-4.6-FP8"}
    assert served == {p.name: p.stat().st_size for p in fp8.iterdir() if not p.name.startswith(".")}
    before = sum(fakehub.bytes_sent.values())
    code, _, err = _cli("pull", "glm-4.6-fp8", "--quant", "bf16", "--from-source", "--keep-source")
    assert code == 0, err
    assert sum(fakehub.bytes_sent.values()) == before
    local = tmp_path / "GLM-4.6-FP8"
    shutil.copytree(fp8, local, ignore=shutil.ignore_patterns(".*"))
    store = Store()
    for quant in ("q4_k_m", "bf16"):
        ref = convert(local, tmp_path / f"ref-{quant}.gguf", quant=quant, threads=2).path
        assert store.gguf_path(store.read_manifest("glm-4.6-fp8", quant)).read_bytes() == ref.read_bytes()


def test_plan_gives_converts_line_for_a_checkpoint_it_would_refuse(ckpt_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("GLMLOCAL_HOME", str(tmp_path / "store"))
    hw = ["--quant", "q4_k_m", "--cpu-only", "--ram", "8GiB"]
    src = _pack_quantized(ckpt_factory("air", "ct-block"), tmp_path / "ck")
    code, _, err = _cli("plan", str(src), *hw)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and REFUSED in lines[0], err
    code, out, err = _cli("plan", str(ckpt_factory("air", "ct-block")), *hw, "--json")
    assert code == 0, err
    assert json.loads(out)["footprint_source"].endswith("config.json")
