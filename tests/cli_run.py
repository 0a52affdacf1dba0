"""Run the real `glmlocal` command as a user does: piped (output captured, no terminal) or on a pseudo-terminal
(pexpect) read back through a terminal emulator (pyte), so a test sees what a person would see."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def default_sigint() -> None:
    """preexec_fn for a child that a test will send Ctrl-C (SIGINT). A pytest started in the background
    (`setsid ... &`, nohup, some CI runners) ignores SIGINT from the start and its children inherit that, so
    Python in the child never installs its KeyboardInterrupt handler; restore the default a terminal gives."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env(home: Path | None, **extra: str) -> dict[str, str]:
    """The environment of a user's shell for `glmlocal`: this checkout first on the path, the store in `home`
    (None: the caller's $GLMLOCAL_HOME), none of the terminal hints a clean shell would not set."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if home is not None:
        env["GLMLOCAL_HOME"] = str(home)
    for name in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TERM_PROGRAM"):
        env.pop(name, None)
    return {**env, **extra}


def run_piped(args: list[str], home: Path | None = None, *, stdin: str | None = "", timeout: float = 300,
              cwd: Path | None = None, preexec_fn=None, **env: str) -> subprocess.CompletedProcess:
    """`glmlocal ARGS` with stdout and stderr pipes (as in `glmlocal ... | less` or a script) and stdin a pipe
    holding `stdin` (None: /dev/null), run in `cwd` (default: `home`, else the repository)."""
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, "-m", "glmlocal", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or home or REPO, env=cli_env(home, **env), check=False,
                          preexec_fn=preexec_fn, **feed)


@dataclass
class Screen:
    """What a terminal showed: its lines (trailing blanks dropped), the same rows as the terminal holds them
    (full width, for joining rows the terminal wrapped), and the exit status."""

    lines: list[str]
    status: int | None
    raw: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def run_on_pty(args: list[str], home: Path, *, cols: int = 100, rows: int = 400, timeout: float = 300,
               **env: str) -> Screen:
    """`glmlocal ARGS` on a pseudo-terminal of `cols` x `rows` (tall enough that nothing scrolls away)."""
    import pexpect
    import pyte

    child = pexpect.spawn(sys.executable, ["-m", "glmlocal", *args], env=cli_env(home, TERM="xterm-256color", **env),
                          cwd=str(home), dimensions=(rows, cols), encoding="utf-8", timeout=timeout,
                          preexec_fn=default_sigint)
    screen = pyte.Screen(cols, rows)
    stream = pyte.Stream(screen)
    try:
        while True:
            try:
                stream.feed(child.read_nonblocking(65536, timeout=timeout))
            except pexpect.EOF:
                break
    finally:
        child.close()
    raw = list(screen.display)
    lines = [line.rstrip() for line in raw]
    while lines and not lines[-1]:
        lines.pop()
    status = child.exitstatus if child.exitstatus is not None else -(child.signalstatus or 0)
    return Screen(lines, status, raw[:len(lines)])
