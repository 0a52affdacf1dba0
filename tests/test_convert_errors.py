"""Bad input to `glmlocal convert`: one clear error line, non-zero exit, nothing under the final name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from glmlocal.errors import DiskSpaceError
from quantize import convert as convert_mod
from quantize.convert import convert
from tests.cli_run import run_piped

REPO = Path(__file__).resolve().parent.parent


def clone(ckpt: Path, dst: Path) -> Path:
    """A writable copy of a checkpoint: small files copied, shards symlinked (replace to modify)."""
    dst.mkdir()
    for f in ckpt.iterdir():
        if f.name.startswith("."):
            continue
        if f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def rewrite_shard(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path.resolve()))
    edit(tensors)
    path.unlink()
    save_file(tensors, str(path), metadata={"format": "pt"})


def run_cli(src: Path, out: Path, *extra: str, preexec=None) -> subprocess.CompletedProcess:
    return run_piped(["convert", str(src), "-q", "q4_k_m", "-o", str(out), *extra], preexec_fn=preexec)


def assert_clean_failure(proc, out: Path, needle: str) -> None:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode != 0, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_missing_shard(tiny_ckpt, tmp_path):
    src = clone(tiny_ckpt, tmp_path / "ck")
    shards(src)[1].unlink()
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli(src, out), out, "missing checkpoint shard")


def test_truncated_shard(tiny_ckpt, tmp_path):
    src = clone(tiny_ckpt, tmp_path / "ck")
    victim = shards(src)[-1]
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli(src, out), out, "is truncated")


def test_wrong_architecture(tiny_ckpt, tmp_path):
    src = clone(tiny_ckpt, tmp_path / "ck")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli(src, out), out, "not a GLM-4.5/4.6/4.7 MoE checkpoint")


def test_unsupported_dtype(tiny_ckpt, tmp_path):
    import torch

    src = clone(tiny_ckpt, tmp_path / "ck")

    def to_f64(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.float64)

    holder = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    rewrite_shard(src / holder, to_f64)
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli(src, out), out, "unsupported dtype F64")


def test_unknown_tensor(tiny_ckpt, tmp_path):
    import torch

    src = clone(tiny_ckpt, tmp_path / "ck")
    rewrite_shard(shards(src)[0], lambda t: t.update({"model.vision_tower.proj.weight": torch.zeros(4, 4)}))
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli(src, out), out, "unknown tensor model.vision_tower.proj.weight")


def test_output_not_writable(tiny_ckpt, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "o.gguf"  # parent is a regular file
    proc = run_cli(tiny_ckpt, out)
    assert_clean_failure(proc, out, "cannot write")


def test_disk_full_preflight_on_tiny_tmpfs(tiny_ckpt, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "o.gguf"
        assert_clean_failure(run_cli(tiny_ckpt, out), out, "not enough disk space")
        # and the real ENOSPC mid-write path, with the preflight check bypassed
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(convert_mod, "_preflight", lambda out, total: None)
            with pytest.raises(DiskSpaceError):
                convert(tiny_ckpt, out, quant="q8_0")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_mid_write_via_rlimit(tiny_ckpt, tmp_path):
    """RLIMIT_FSIZE makes write() fail with EFBIG after 2 MB, mid-conversion."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))

    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli(tiny_ckpt, out, preexec=limit), out, "file size limit reached")


def test_enospc_from_write_cleans_up(tiny_ckpt, tmp_path, monkeypatch):
    """The output file's write() raises ENOSPC halfway: DiskSpaceError, no .part, no final file."""
    import errno

    from quantize import writer as writer_mod

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += 1
            if self.n > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_open = writer_mod.GGUFWriter.open

    def open_full(self):
        real_open(self)
        self._f = FullDisk(self._f)

    monkeypatch.setattr(writer_mod.GGUFWriter, "open", open_full)
    out = tmp_path / "o.gguf"
    with pytest.raises(DiskSpaceError):
        convert(tiny_ckpt, out, quant="q4_k_m")
    assert os.listdir(tmp_path) == []


def test_bad_quant_name(tiny_ckpt, tmp_path):
    out = tmp_path / "o.gguf"
    proc = run_piped(["convert", str(tiny_ckpt), "-q", "q3_k", "-o", str(out)], timeout=120)
    assert_clean_failure(proc, out, "unknown quant 'q3_k'")


def test_existing_output_survives_a_failed_conversion(tiny_ckpt, tmp_path):
    """A failed run never touches a file already under the final name."""
    src = clone(tiny_ckpt, tmp_path / "ck")
    shards(src)[0].unlink()
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous")
    proc = run_cli(src, out)
    assert proc.returncode != 0 and out.read_bytes() == b"previous"
