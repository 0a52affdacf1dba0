"""`--rpc HOST:PORT` (plan, chat) and `glmlocal rpc-server`, end to end through the CLI: a second
machine's backend lent over llama.cpp's RPC protocol, here a `glmlocal rpc-server` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmlocal.llama import rpc
from tests.cli_run import run_piped

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not rpc.rpc_available(),
                                reason="llama-cpp-python built without -DGGML_RPC=ON (see glmlocal doctor --cmake-args)")


def glmlocal(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return run_piped(list(args), stdin=stdin)


@contextlib.contextmanager
def rpc_server_process():
    """`glmlocal rpc-server 127.0.0.1:PORT` in a child process; yields (endpoint, process); after the block
    the process has stopped and `proc.output` holds what it printed. (rpc.RpcServer starts the same
    command but discards its output.)"""
    port = rpc._free_port("127.0.0.1")
    endpoint = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "glmlocal", "rpc-server", endpoint, "--threads", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not rpc._reachable("127.0.0.1", port, 0.5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    try:
        yield endpoint, proc
    finally:
        proc.terminate()
        proc.output, err = proc.communicate(timeout=20)
    assert "warning" not in err  # loopback: no network warning


@pytest.fixture(scope="module")
def rpc_server():
    with rpc_server_process() as server:
        yield server


@pytest.fixture(scope="module")
def mid(gguf_factory):
    return str(gguf_factory("mid", "q4_k_m"))


def test_plan_with_rpc_puts_layers_on_the_remote_device_and_prints_the_flag(rpc_server, mid):
    endpoint, _ = rpc_server
    res = glmlocal("plan", mid, "--rpc", endpoint, "--ctx", "1024", "--ram", "16GiB", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    names = [d["name"] for d in doc["placement"]["devices"]]
    assert names == ["RPC0", "CPU"]
    rpc0 = doc["placement"]["devices"][0]
    assert rpc0["weights"] > 0 and rpc0["kv"] > 0 and rpc0["layers"] == [0, 1, 2, 3]
    assert doc["placement"]["n_gpu_layers"] > 0
    assert doc["placement"]["llama_cpp_flags"].endswith(f"--rpc {endpoint}")
    # The capacity is what the server reports (its machine's memory), not a guess.
    assert rpc0["capacity"] > 2**30


def test_chat_with_rpc_generates_through_the_remote_device(mid):
    with rpc_server_process() as (endpoint, proc):
        res = glmlocal("chat", mid, "--rpc", endpoint, "--ctx", "1024", "--max-tokens", "6", "--temperature", "0",
                       "--no-think", stdin="Say hi")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()  # the random model's answer, computed with every layer on RPC0
    assert "Accepted client connection" in proc.output and "Client connection closed" in proc.output


def test_unreachable_or_malformed_rpc_endpoint_is_one_error_line(mid):
    res = glmlocal("plan", mid, "--rpc", f"127.0.0.1:{rpc._free_port('127.0.0.1')}", "--ctx", "1024")
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error:"), res.stderr
    assert "RPC" in res.stderr
    res = glmlocal("plan", mid, "--rpc", "no-port-here", "--ctx", "1024")
    assert res.returncode != 0 and res.stderr.startswith("error: bad RPC endpoint"), res.stderr
