"""Run `glmlocal serve` as a real subprocess on 127.0.0.1 for the live-server tests and the benchmark."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.cli_run import default_sigint

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m glmlocal serve MODEL --port P ...`; waits for /health, stops with SIGINT then SIGKILL."""

    def __init__(self, model: Path | str, *args: str, api_key: str | None = None, startup_s: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        argv = [sys.executable, "-m", "glmlocal", "serve", str(model), "--port", str(self.port), *args]
        if api_key:
            argv += ["--api-key", api_key]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("GLMLOCAL_API_KEY", None)
        self.out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - a file, not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.out, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=default_sigint)  # stop() sends SIGINT, even from a background pytest
        self._wait(startup_s)

    def _wait(self, startup_s: float) -> None:
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"glmlocal serve exited {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("glmlocal serve did not become healthy in time")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: uvicorn's graceful shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.output()

    def output(self) -> str:
        self.out.seek(0)
        return self.out.read()
