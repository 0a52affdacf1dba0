"""What a newcomer sees (issue 15), read as they read it: the real `glmlocal` command run piped (a script, `| less`)
and on a pseudo-terminal (a person), never through CliRunner. Help conventions, --version, units, copyable
llama.cpp flags, the straight answer on a small machine, did-you-mean, the order of chat's checks, the serve
port error."""

from __future__ import annotations

import re
import shlex
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.cli_run import REPO, run_on_pty, run_piped

COMMANDS = ("convert", "pull", "list", "rm", "plan", "chat", "serve", "rpc-server", "doctor")
TYPE_LABEL = re.compile(r"<(?:str|int|bool|float|path|text|list\[[^\]]*\])>|\{\w+\}")  # Typer's type noise


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


# -- 5. help conventions -------------------------------------------------------------------------------------
def test_help_reads_like_a_conventional_cli(home):
    top = run_piped(["--help"], home)
    assert top.returncode == 0 and not TYPE_LABEL.search(top.stdout), top.stdout
    assert "Usage: glmlocal [OPTIONS] COMMAND [ARGS]..." in top.stdout
    assert re.search(r"--version\s+Print the version", top.stdout) and re.search(r"--help\s+-h\s", top.stdout)
    for cmd in COMMANDS:
        out = run_piped([cmd, "-h"], home)  # -h everywhere, as ollama, llama.cpp and pip have it
        assert out.returncode == 0 and f"Usage: glmlocal {cmd} [OPTIONS]" in out.stdout, (cmd, out.stderr)
        assert not TYPE_LABEL.search(out.stdout), (cmd, TYPE_LABEL.search(out.stdout), out.stdout)
        assert re.search(r"--help\s+-h\s+Show this message", out.stdout), cmd
    plan = run_piped(["plan", "-h"], home).stdout
    assert "Usage: glmlocal plan [OPTIONS] MODEL" in plan
    for option, metavar in (("--quant", "QUANT"), ("--ctx", "TOKENS"), ("--ram", "SIZE"), ("--rpc", "HOST:PORT"),
                            ("--machine", "MACHINE")):
        assert re.search(rf"{option}\s+(?:-\w\s+)?{re.escape(metavar)}\s", plan), option
    assert re.search(r"--cpu-only\s+Plan without GPUs", plan)  # a flag: no value shown at all
    missing = run_piped(["plan"], home)
    assert missing.returncode == 2 and "Missing argument 'MODEL'" in missing.stderr


def test_help_on_a_terminal(home):
    screen = run_on_pty(["plan", "--help"], home, cols=100)
    assert screen.status == 0
    assert any(line.strip().startswith("Usage: glmlocal plan [OPTIONS] MODEL") for line in screen.lines)
    assert not TYPE_LABEL.search(screen.text) and re.search(r"--quant\s+-q\s+QUANT", screen.text)


def test_version_is_one_line_with_the_llama_cpp_build(home):
    from glmlocal import __version__
    from glmlocal.llama import ggml

    commit, ggml_version = ggml.build_info()
    want = (f"glmlocal {__version__} (llama-cpp-python {version('llama-cpp-python')}, llama.cpp {commit}, "
            f"ggml {ggml_version}; backends: {', '.join(ggml.backend_names())})")
    piped = run_piped(["--version"], home)
    assert piped.returncode == 0 and piped.stdout == want + "\n" and "CPU" in want
    screen = run_on_pty(["--version"], home, cols=200)
    assert screen.status == 0 and screen.lines == [want]


def test_installed_typer_is_inside_the_pinned_range():
    """glmlocal/cli/style.py restyles help through Typer's parameter classes: the range in pyproject.toml is the
    one it was written against, and the installed Typer must be inside it."""
    from packaging.requirements import Requirement

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (typer_req,) = [Requirement(d) for d in deps if Requirement(d).name == "typer"]
    assert typer_req.specifier, "typer must have an upper bound"
    assert any(s.operator == "<" for s in typer_req.specifier)
    assert typer_req.specifier.contains(version("typer")), (version("typer"), str(typer_req.specifier))


# -- 2. one unit, 3. copyable flags, 4. "the planned machine" ---------------------------------------------------
PLANNED = ["--gpu-mem", "24GiB", "--ram", "64GiB", "--threads", "16", "--gpu-bw", "936", "--cpu-bw", "89.6"]
DECIMAL_BYTES = re.compile(r"\d\s*(?:GB|MB|TB)\b(?!/s)")  # a byte count in decimal units (rates are GB/s, MB/s)


def _flags_line(text: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("-ngl ")]
    return line


def test_plan_prints_gib_and_flags_a_shell_takes_as_is(home):
    out = run_piped(["plan", "glm-4.5-air", "--quant", "q4_k_m", *PLANNED], home)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert not DECIMAL_BYTES.search(text), DECIMAL_BYTES.search(text)
    assert re.search(r"GLM-4.5-Air q4_k_m: \d+\.\d GiB of weights \(file \d+\.\d GiB; from models\.toml", text)
    for row in ("weights GiB", "KV cache GiB", "total / capacity GiB", "read per token GiB", "bandwidth GB/s"):
        assert row in text, row
    assert "╭" not in text and "│" not in text  # no box around anything
    doc = run_piped(["plan", "glm-4.5-air", "--quant", "q4_k_m", *PLANNED, "--json"], home)
    placement = __import__("json").loads(doc.stdout)["placement"]
    flags = _flags_line(text)
    assert flags == placement["llama_cpp_flags"]  # one whole line, however long (no wrapping in a pipe)
    assert len(flags) > 200
    # pasted into a shell, -ot gets each pattern=buffer exactly, and llama.cpp's regex search finds the tensors
    args = shlex.split(flags)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "-ot"]
    assert overrides == [f"{p}={b}" for p, b in placement["tensor_overrides"]] and len(overrides) >= 2
    pattern = overrides[0].rsplit("=", 1)[0]
    assert re.search(pattern, "blk.45.ffn_up_exps.weight") and not re.search(pattern, "blk.45.attn_q.weight")
    # notes are whole lines too
    assert any(ln.startswith("- speed estimate ") and ln.endswith("KV read at 4096 tokens") for ln in text.splitlines())
    assert "the planned machine" not in text  # it fits: nothing to say about the machine
    assert "threads 16" not in text


def test_plan_flags_on_a_terminal_are_one_soft_wrapped_line(home):
    """On an 80-column terminal the flags wrap where the terminal wraps them (no box, no inserted newlines):
    the screen rows from `-ngl` on, joined, give back the flags exactly."""
    doc = run_piped(["plan", "glm-4.5-air", "--quant", "q4_k_m", *PLANNED, "--json"], home)
    flags = __import__("json").loads(doc.stdout)["placement"]["llama_cpp_flags"]
    screen = run_on_pty(["plan", "glm-4.5-air", "--quant", "q4_k_m", *PLANNED], home, cols=80)
    assert screen.status == 0
    start = next(i for i, row in enumerate(screen.raw) if row.startswith("-ngl "))
    rows = -(-len(flags) // 80)
    assert "".join(screen.raw[start:start + rows]).rstrip() == flags
    assert "│" not in "".join(screen.raw[start:start + rows]) and not DECIMAL_BYTES.search(screen.text)


def test_planned_machines_are_called_the_planned_machine(home):
    given = run_piped(["plan", "glm-4.6", "--quant", "q8_0", "--gpu-mem", "24GiB", "--ram", "256GiB"], home)
    assert given.returncode == 1 and "the planned machine has" in given.stderr and "this machine" not in given.stderr
    profile = run_piped(["plan", "glm-4.5-air", "--machine", "m1-max-64", "--ctx", "65536"], home)
    assert profile.returncode == 1, profile.stderr
    assert "the planned machine (m1-max-64) has" in profile.stderr and "this machine" not in profile.stderr
