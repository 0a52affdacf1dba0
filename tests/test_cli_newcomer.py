"""What a newcomer sees (issue 15), read as they read it: the real `glmlocal` command run piped (a script, `| less`)
and on a pseudo-terminal (a person), never through CliRunner. Help conventions, --version, units, copyable
llama.cpp flags, the straight answer on a small machine, did-you-mean, the order of chat's checks, the serve
port error."""

from __future__ import annotations

import re
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
