"""What a newcomer sees (issue 15), read as they read it: the real `glmlocal` command run piped (a script, `| less`)
and on a pseudo-terminal (a person), never through CliRunner. Help conventions, --version, units, copyable
llama.cpp flags, the straight answer on a small machine, did-you-mean, the order of chat's checks, the serve
port error."""

from __future__ import annotations

import json
import re
import shlex
import socket
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.cli_run import REPO, run_on_pty, run_piped
from tests.test_remote_gguf import published, ud_parts  # noqa: F401 (fixtures: a fake hub with a published quant)

COMMANDS = ("convert", "pull", "list", "rm", "plan", "chat", "serve", "rpc-server", "doctor")
TYPE_LABEL = re.compile(r"<(?:str|int|bool|float|path|text|list\[[^\]]*\])>|\{\w+\}")  # Typer's type noise


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """An empty store (no cached headers: only the recipe quants are sized) for the CLI and this process."""
    (tmp_path / "home").mkdir(exist_ok=True)
    monkeypatch.setenv("GLMLOCAL_HOME", str(tmp_path / "home"))
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
    placement = json.loads(doc.stdout)["placement"]
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
    assert all(line == line.rstrip() for line in text.splitlines())  # no padding out to a pipe's "width"
    survey = run_piped(["plan", "glm-4.5-air", "--machines"], home)
    rows = survey.stdout.splitlines()
    assert survey.returncode == 0 and all(line == line.rstrip() for line in rows)
    assert re.search(r"^\s+machine\s+memory\s+backend\s+fits\s+best quant\s+file GiB\s+context", survey.stdout, re.M)
    assert any(re.match(r"\s+m4-max-128\s+128 GiB unified \(GPU 107\.5 GiB\)\s", row) for row in rows)
    assert not DECIMAL_BYTES.search(survey.stdout)


def test_plan_flags_on_a_terminal_are_one_soft_wrapped_line(home):
    """On an 80-column terminal the flags wrap where the terminal wraps them (no box, no inserted newlines):
    the screen rows from `-ngl` on, joined, give back the flags exactly."""
    doc = run_piped(["plan", "glm-4.5-air", "--quant", "q4_k_m", *PLANNED, "--json"], home)
    flags = json.loads(doc.stdout)["placement"]["llama_cpp_flags"]
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


# -- 1. a small machine gets a straight answer -----------------------------------------------------------------
SMALL = ["--cpu-only", "--ram", "24GiB"]


def _expected_lines() -> list[str]:
    from glmlocal.plan.minimum import minimums
    from glmlocal.plan.view import minimum_lines

    return minimum_lines(minimums())


def test_plan_on_a_machine_too_small_for_any_model_says_so(home):
    out = run_piped(["plan", "glm-4.5-air", *SMALL], home)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert lines[0].startswith("error: the planned machine cannot run GLM-4.5-Air: its smallest quant known here, "
                               "q4_k_m (67.8 GiB file), needs 68.7 GiB of RAM + VRAM with 4096 tokens of context; "
                               "the planned machine has 24.0 GiB available"), lines[0]
    expected = _expected_lines()
    assert [ln.strip() for ln in lines[2:2 + len(expected)]] == expected and len(expected) == 4
    assert expected[0].startswith("GLM-4.5-Air q4_k_m: 67.8 GiB file, needs 68.7 GiB of RAM + VRAM; runs on "
                                  "dgx-spark (121.7 GiB, ~23 tok/s), m4-max-128 (128.0 GiB")
    text = out.stderr
    assert "GLM-4.5-Air ud-q2_k_xl at least 25.7 GiB" in text  # not sized here, and still ruled out
    assert "when online" not in text and "could not be sized" not in text  # no trip in a circle
    assert "--machine NAME" in text and not DECIMAL_BYTES.search(text)
    doc = json.loads(run_piped(["plan", "glm-4.5-air", *SMALL, "--json"], home).stdout)
    assert doc["fits"] is False and doc["usable_bytes"] == 24 << 30 and doc["runs_here"] == []
    air = next(m for m in doc["smallest"] if m["name"] == "glm-4.5-air")
    assert air["quant"] == "q4_k_m" and round(air["need_bytes"] / (1 << 30), 1) == 68.7
    assert air["profiles"][0]["name"] == "dgx-spark" and isinstance(air["file_bytes"], int)


def test_the_straight_answer_on_a_terminal(home):
    screen = run_on_pty(["plan", "glm-4.5-air", *SMALL], home, cols=80)
    assert screen.status == 1
    joined = "".join(screen.raw)  # the terminal wrapped long lines; nothing else did
    for line in _expected_lines():
        assert line in joined, line


@pytest.mark.usefixtures("published")
def test_a_machine_that_can_run_another_model_is_told_which(home):
    """With GLM-4.6's published ud-q2_k_xl headers cached (a tiny fixture stands in for the real file), that quant
    is the smallest known for GLM-4.6: planning GLM-4.5-Air on the small machine names GLM-4.6 as what runs."""
    sized = run_piped(["plan", "glm-4.6", "--quant", "ud-q2_k_xl", *SMALL], home)
    assert sized.returncode == 0, sized.stderr
    out = run_piped(["plan", "glm-4.5-air", *SMALL], home, HF_HUB_OFFLINE="1")  # the cache is enough
    assert out.returncode == 1
    assert "  GLM-4.6 ud-q2_k_xl (published): " in out.stderr
    assert "runs here: GLM-4.6 ud-q2_k_xl (glmlocal plan glm-4.6)" in out.stderr


@pytest.mark.slow  # the doctor's smoke test, twice
def test_doctor_on_this_machine_gives_the_same_answer(home):
    import psutil

    from glmlocal.plan.minimum import minimums

    models = minimums()
    total = psutil.virtual_memory().total
    piped = run_piped(["doctor"], home)
    assert piped.returncode == 0, piped.stdout + piped.stderr
    (ram,) = [ln for ln in piped.stdout.splitlines() if ln.startswith(("✓ RAM:", "! RAM:"))]
    assert not DECIMAL_BYTES.search(piped.stdout) and "~68 GB" not in piped.stdout
    if all(m.need_bytes > total for m in models) and not any(m.might_fit(total) for m in models):  # no GPU here
        assert ram.endswith("this machine cannot run any GLM-4.x model")
        for line in _expected_lines():
            assert f"      {line}" in piped.stdout.splitlines()
        assert "`glmlocal rpc-server 0.0.0.0:50052` lends this machine's memory" in piped.stdout
    screen = run_on_pty(["doctor"], home, cols=100)
    joined = "".join(screen.raw)  # rows the terminal wrapped, joined back
    verdict = ram.split(", no GPU memory")[-1].split(" GiB VRAM")[-1]  # what follows the (changing) free RAM
    assert screen.status == 0 and any(ln.startswith(ram[:7]) for ln in screen.lines) and verdict in joined
    assert joined.count("GLM-4.5-Air q4_k_m") == piped.stdout.count("GLM-4.5-Air q4_k_m")


def test_ram_check_branches():
    from glmlocal.doctor.memory import ram_check
    from glmlocal.plan.minimum import minimums

    gib = 1 << 30
    models = minimums()
    small = ram_check(24 * gib, 22 * gib, 0, models)
    assert small.status == "warn" and small.detail.endswith("this machine cannot run any GLM-4.x model")
    assert len([ln for ln in small.more if ln.startswith("  GLM-")]) == 4 and "rpc-server" in small.more[-1]
    maybe = ram_check(48 * gib, 40 * gib, 0, models)  # above Air ud-q2_k_xl's 25.7 GiB floor: it might fit
    assert maybe.status == "warn" and "might" in maybe.detail and maybe.fix == "glmlocal plan glm-4.5-air --quant ud-q2_k_xl"
    ok = ram_check(64 * gib, 60 * gib, 24 * gib, models)
    assert ok.status == "ok" and ok.detail.endswith("enough for GLM-4.5-Air q4_k_m (needs 68.7 GiB of RAM + VRAM)")
    big = ram_check(512 * gib, 500 * gib, 0, models)
    assert "enough for GLM-4." in big.detail and "201.9 GiB" in big.detail


# -- 6. unknown names, 7. chat's order of checks, 8. the serve port error -------------------------------------
def test_unknown_names_suggest_the_near_miss(home):
    for args in (["plan", "glm-4.5-ari"], ["pull", "glm-4.5-ari"], ["chat", "glm-4.5-ari"]):
        out = run_piped(args, home)
        (line,) = out.stderr.splitlines()
        assert out.returncode == 2 and line.startswith("error: unknown model 'glm-4.5-ari'; did you mean glm-4.5-air? "
                                                       "(known models: glm-4.5, "), (args, out.stderr)
    far = run_piped(["plan", "glm-9"], home).stderr
    assert "did you mean" not in far and "known models: glm-4.5" in far  # nothing close: no guess
    machine = run_piped(["plan", "glm-4.5-air", "--machine", "m4max-128"], home).stderr
    assert machine.startswith("error: unknown machine 'm4max-128'; did you mean m4-max-128? (known machines: ")
    screen = run_on_pty(["plan", "glm-4.5-ari"], home, cols=300)
    assert screen.status == 2 and screen.lines[0].startswith("error: unknown model 'glm-4.5-ari'; did you mean glm-4.5-air?")


def test_chat_reports_a_missing_model_before_an_empty_stdin(home):
    out = run_piped(["chat", "./nope.gguf"], home, stdin=None)  # stdin is /dev/null
    assert out.returncode == 2 and out.stderr == "error: no such file or directory: ./nope.gguf\n"
    pulled = run_piped(["chat", "glm-4.5-air"], home, stdin=None)
    assert pulled.returncode == 2 and "glm-4.5-air q4_k_m is not pulled yet" in pulled.stderr
    assert "no prompt" not in pulled.stderr
    screen = run_on_pty(["chat", "./nope.gguf"], home)  # a person at a terminal gets the same line
    assert screen.status == 2 and screen.lines == ["error: no such file or directory: ./nope.gguf"]


def test_serve_on_a_busy_port_is_one_clean_sentence(home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        want = (f"error: cannot listen on 127.0.0.1:{port}: another program is listening there; stop it or pick "
                "another --port")
        out = run_piped(["serve", "glm-4.5-air", "--port", str(port)], home)
        assert out.returncode == 2 and out.stderr == want + "\n" and out.stdout == ""
        screen = run_on_pty(["serve", "glm-4.5-air", "--port", str(port)], home, cols=200)
    assert screen.status == 2 and screen.lines == [want]
