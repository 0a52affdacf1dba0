"""`glmlocal plan`: registry names before download, local GGUFs and checkpoints, JSON, and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from glmlocal.cli.app import app

HW = ["--gpu-mem", "24GiB", "--ram", "64GiB", "--threads", "16", "--gpu-bw", "936", "--cpu-bw", "89.6"]


@pytest.fixture(autouse=True)
def empty_store(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMLOCAL_HOME", str(tmp_path / "store"))


def run(*args: str):
    return CliRunner().invoke(app, ["plan", *args], catch_exceptions=False)


def test_registry_model_json_before_download():
    r = run("glm-4.5-air", *HW, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    p = doc["placement"]
    assert doc["model"] == "GLM-4.5-Air" and doc["quant"] == "q4_k_m" and "before download" in doc["footprint_source"]
    assert p["n_gpu_layers"] == 48 and p["n_ctx"] == 65536 and p["type_k"] == "f16"
    assert [d["name"] for d in p["devices"]] == ["CUDA0", "CPU"]
    assert p["llama_cpp_flags"].startswith("-ngl 48 -ot ")
    assert doc["kv_bytes_per_token"] == 188_416 and doc["hardware"]["cores"] == 16


def test_rich_table_shows_devices_flags_and_speed():
    r = run("glm4.6", "--gpu-mem", "24GiB,24GiB", "--ram", "256GiB", "--cpu-bw", "89.6", "--gpu-bw", "936")
    assert r.exit_code == 0, r.output
    for text in ("GLM-4.6 q4_k_m", "CUDA0", "CUDA1", "CPU", "llama.cpp flags", "-ts 46,48", "tokens/s",
                 "KV cache GiB", "headroom GiB"):
        assert text in r.output, text


def test_quant_and_kv_type_options():
    r = run("glm-4.5-air", "--quant", "Q8_0", "--ctx", "131072", "--kv-type", "q8_0", *HW, "--ram", "128GiB", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["quant"] == "q8_0" and doc["placement"]["n_ctx"] == 131072
    assert "-ctk q8_0 -ctv q8_0" in doc["placement"]["llama_cpp_flags"]


def test_cpu_only():
    r = run("glm-4.5-air", "--cpu-only", "--ram", "128GiB", "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)["placement"]
    assert p["n_gpu_layers"] == 0 and [d["name"] for d in p["devices"]] == ["CPU"]


def test_does_not_fit_names_a_smaller_quant():
    r = CliRunner().invoke(app, ["plan", "glm-4.6", "--quant", "q8_0", "--gpu-mem", "24GiB", "--ram", "256GiB"])
    assert r.exit_code == 1
    assert "--quant q6_k fits" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["glm-9"], "known models: glm-4.5"),
    (["glm-4.6", "--quant", "q3_k"], "q4_k_m"),
    (["glm-4.6", "--gpu-mem", "lots"], "cannot parse memory size"),
    (["glm-4.6", "--kv-type", "q3_k", *HW], "unknown KV cache type"),
    (["glm-4.6", "--ctx", "0", *HW], "positive"),
    (["/no/such/file.gguf"], "no such file"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    r = CliRunner().invoke(app, ["plan", *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_local_gguf_uses_its_header(gguf_factory):
    path = gguf_factory("tiny", "q4_k_m")
    r = run(str(path), "--cpu-only", "--ram", "8GiB", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["footprint_source"].startswith("GGUF header") and doc["quant"] == "q4_k_m"
    from glmlocal.plan.footprint import footprint_from_gguf

    assert doc["weights_bytes"] == footprint_from_gguf(path).weights_bytes


def test_checkpoint_dir_uses_its_config(ckpt_factory):
    path = ckpt_factory("tiny")
    r = run(str(path), "--quant", "q8_0", "--cpu-only", "--ram", "8GiB", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["footprint_source"].endswith("config.json") and doc["quant"] == "q8_0"


def test_console_script_entry_point(tmp_path):
    """The real entry point in a fresh interpreter: works with no model downloaded and no GPU."""
    env = {"GLMLOCAL_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "glmlocal", "plan", "glm-4.7", "--gpu-mem", "24GiB", "--ram", "256GiB"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=str(_repo()), check=False)
    assert r.returncode == 0, r.stderr
    assert "GLM-4.7 q4_k_m" in r.stdout and "-ngl 94" in r.stdout


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def test_a_file_that_is_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip file")
    r = CliRunner().invoke(app, ["plan", str(bad), "--cpu-only", "--ram", "8GiB"])
    assert r.exit_code == 2 and "not a GGUF" in r.output and "Traceback" not in r.output
