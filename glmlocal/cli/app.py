"""Typer app: wiring only. One library call per command; every GlmlocalError becomes one line.

Each command imports its implementation lazily so `glmlocal --help` stays fast and a missing optional
piece (e.g. no GPU library) does not break unrelated commands.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from glmlocal.cli.style import HELP_OPTION_NAMES, Group
from glmlocal.errors import GlmlocalError

app = typer.Typer(
    name="glmlocal",
    help="Run GLM-4.5 / 4.5-Air / 4.6 / 4.7 locally: pull, convert, plan, chat, serve.",
    cls=Group,  # conventional help: MODEL, --quant QUANT, flags without type labels (glmlocal/cli/style.py)
    context_settings={"help_option_names": HELP_OPTION_NAMES},  # -h and --help, on every command
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version_line() -> str:
    """glmlocal's version, the llama-cpp-python and llama.cpp build it runs on, and that build's backends."""
    from importlib.metadata import version

    from glmlocal import __version__

    line = f"glmlocal {__version__}"
    try:
        from glmlocal.llama import ggml

        commit, ggml_version = ggml.build_info()
        backends = ", ".join(ggml.backend_names())
        line += (f" (llama-cpp-python {version('llama-cpp-python')}, llama.cpp {commit}, ggml {ggml_version}; "
                 f"backends: {backends})")
    except Exception as e:  # noqa: BLE001 (a broken build must not hide the version; `glmlocal doctor` explains)
        line += f" (llama.cpp could not be loaded: {type(e).__name__}: {e})"
    return line


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line())
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version, the llama.cpp build and its backends, and exit")] = False,
) -> None:
    """Run GLM-4.5 / 4.5-Air / 4.6 / 4.7 locally: pull, convert, plan, chat, serve."""


# Planner options shared by plan, chat and serve (one definition, one help text).
QuantOpt = Annotated[Optional[str], typer.Option("--quant", "-q", help="q4_k_m, q6_k, q8_0, bf16, or a published GGUF's quant such as ud-q2_k_xl (registry models)")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", "-c", metavar="TOKENS", help="Context length (default: the largest that fits, up to 64K)")]
KvTypeOpt = Annotated[Optional[str], typer.Option("--kv-type", help="KV cache type: f16, q8_0 or q4_0 (default: the planner's choice)")]
GpuMemOpt = Annotated[Optional[str], typer.Option("--gpu-mem", metavar="SIZES", help="Plan for these GPUs instead of the probed ones, e.g. 24GiB,24GiB")]
RamOpt = Annotated[Optional[str], typer.Option("--ram", metavar="SIZE", help="Plan for this much RAM instead of the probed amount, e.g. 128GiB")]
CpuOnlyOpt = Annotated[bool, typer.Option("--cpu-only", help="Plan without GPUs")]
UbatchOpt = Annotated[Optional[int], typer.Option("--ubatch", metavar="N", min=1, help="llama.cpp's n_ubatch (and n_batch) instead of the planner's choice (default: the fastest predicted prompt that costs no context and under 3% of decode speed)")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", "-t", metavar="N", help="CPU threads (default: physical cores)")]
TemplateOpt = Annotated[Optional[Path], typer.Option("--template", help="Chat template file to use instead of the model's")]
SpecOpt = Annotated[str, typer.Option("--spec", metavar="MODE", help="Speculative decoding: auto (MTP when the GGUF has a NextN layer and the plan has room, n-gram drafts always; measured, drafts only while they pay), mtp, ngram, mtp+ngram or off")]
DraftOpt = Annotated[Optional[int], typer.Option("--draft", metavar="N", min=1, help="Most tokens drafted per step (default: MTP 3 or the plan's choice, n-gram 16)")]
RpcOpt = Annotated[Optional[list[str]], typer.Option("--rpc", metavar="HOST:PORT", help="A llama.cpp RPC server (HOST:PORT) to use as a GPU, e.g. on a second machine (repeatable or comma-separated; see `glmlocal rpc-server`)")]


def _endpoints(rpc: list[str] | None) -> tuple[str, ...]:
    return tuple(e.strip() for item in rpc or () for e in item.split(",") if e.strip())


def _fail(err: GlmlocalError) -> None:
    typer.secho(f"error: {err.one_line()}", fg=typer.colors.RED, err=True)
    raise typer.Exit(err.exit_code)


def command(name: str | None = None) -> Callable[[Callable], Callable]:
    """Register a command whose GlmlocalErrors become one red `error:` line and the error's exit code."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except GlmlocalError as e:
                _fail(e)

        return app.command(name)(run)

    return register


# ---------------------------------------------------------------------------------------------
# convert (issue 2)
# ---------------------------------------------------------------------------------------------
@command()
def convert(
    src: Annotated[Path, typer.Argument(help="Directory with config.json, tokenizer and safetensors shards")],
    quant: Annotated[str, typer.Option("--quant", "-q", help="bf16, q8_0, q6_k or q4_k_m")] = "q4_k_m",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .gguf path")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="Quantizer threads (default: all cores)")] = None,
    no_mtp: Annotated[bool, typer.Option("--no-mtp", help="Drop the NextN/MTP block")] = False,
) -> None:
    """Convert a GLM-4.x safetensors checkpoint (BF16 or FP8) to GGUF in one streamed pass."""
    from glmlocal.cli.convert import run_convert

    run_convert(src, quant=quant, out=out, threads=threads, no_mtp=no_mtp)


# ---------------------------------------------------------------------------------------------
# pull / list / rm (issue 7)
# ---------------------------------------------------------------------------------------------
@command()
def pull(
    model: Annotated[str, typer.Argument(help="Registry name or alias, e.g. glm-4.6 or zai-org/GLM-4.6")],
    quant: Annotated[str, typer.Option("--quant", "-q", help="q4_k_m, q6_k, q8_0, bf16, or a published-only quant such as ud-q2_k_xl")] = "q4_k_m",
    from_source: Annotated[bool, typer.Option("--from-source", help="Convert the safetensors checkpoint even if a GGUF is published")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit of the repository")] = None,
    keep_source: Annotated[bool, typer.Option("--keep-source", help="Keep the downloaded safetensors after converting")] = False,
    source: Annotated[Optional[str], typer.Option("--source", help="Convert from the bf16 or fp8 checkpoint (default: chosen by quant and size)")] = None,
) -> None:
    """Download a model at a quant: a published GGUF, or the checkpoint converted locally. Resumable and verified."""
    from glmlocal.cli.pull import run_pull

    try:
        run_pull(model, quant, from_source=from_source, revision=revision, keep_source=keep_source, source=source)
    except KeyboardInterrupt:
        typer.secho("interrupted: run the same command again to resume", err=True)
        raise typer.Exit(130)


@command("list")
def list_models() -> None:
    """Pulled models: name, quant, size, path, and whether complete and verified (half-finished pulls too)."""
    from glmlocal.cli.pull import run_list

    run_list()


@command()
def rm(
    model: Annotated[str, typer.Argument(help="Registry name or alias of a pulled model")],
    quant: Annotated[Optional[str], typer.Option("--quant", "-q", help="Remove only this quant (default: everything)")] = None,
) -> None:
    """Delete a pulled model (one quant, or all of it including kept sources) and say how much space was freed."""
    from glmlocal.cli.pull import run_rm

    run_rm(model, quant)


# ---------------------------------------------------------------------------------------------
# plan (issue 3)
# ---------------------------------------------------------------------------------------------
@command()
def plan(
    model: Annotated[str, typer.Argument(help="Registry name (works before download), pulled model, .gguf or checkpoint dir")],
    quant: QuantOpt = None,
    ctx: CtxOpt = None,
    kv_type: Annotated[str, typer.Option("--kv-type", help="KV cache type: f16, q8_0 or q4_0")] = "f16",
    gpu_mem: GpuMemOpt = None,
    ram: RamOpt = None,
    cpu_only: CpuOnlyOpt = False,
    ubatch: UbatchOpt = None,
    threads: ThreadsOpt = None,
    gpu_bw: Annotated[Optional[float], typer.Option("--gpu-bw", metavar="GB/S", help="GPU memory bandwidth in GB/s (speed estimate)")] = None,
    cpu_bw: Annotated[Optional[float], typer.Option("--cpu-bw", metavar="GB/S", help="RAM bandwidth in GB/s (speed estimate)")] = None,
    rpc: RpcOpt = None,
    machine: Annotated[Optional[str], typer.Option("--machine", help="Plan for a named machine profile (machines.toml) instead of this machine, e.g. m4-max-128")] = None,
    machines: Annotated[bool, typer.Option("--machines", help="One table across every machine profile: fits or not, best quant, context, est. tokens/s")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show where each part of MODEL would live (GPU/CPU), how much context fits, and the speed to expect."""
    from glmlocal.plan.options import PlanOptions

    if machines:
        from glmlocal.cli.machines import run_machines
        from glmlocal.errors import InputError

        if machine or gpu_mem or ram or cpu_only or rpc:
            raise InputError("--machines plans for every profile: drop --machine, --gpu-mem, --ram, --cpu-only, --rpc")
        run_machines(model, quant, ctx=ctx, kv_type=kv_type, as_json=as_json)
        return
    from glmlocal.cli.plan import run_plan

    options = PlanOptions(ctx=ctx, kv_type=kv_type, gpu_mem=gpu_mem, ram=ram, cpu_only=cpu_only, threads=threads,
                          gpu_bw=gpu_bw, cpu_bw=cpu_bw, rpc=_endpoints(rpc), machine=machine, ubatch=ubatch)
    run_plan(model, quant, options, as_json=as_json)


# ---------------------------------------------------------------------------------------------
# chat (issue 6)
# ---------------------------------------------------------------------------------------------
@command()
def chat(
    model: Annotated[str, typer.Argument(help="Registry name (glm-4.6[:quant]), pulled model, or a .gguf path")],
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt")] = None,
    no_think: Annotated[bool, typer.Option("--no-think", help="Start with thinking off (/think on|off)")] = False,
    think_budget: Annotated[Optional[int], typer.Option("--think-budget", metavar="N", min=1, help="Most tokens a reply may spend thinking (/think N)")] = None,
    show_thinking: Annotated[bool, typer.Option("--show-thinking", help="Keep thinking expanded (piped: print it in <think>...</think>)")] = False,
    tools: Annotated[Optional[Path], typer.Option("--tools", help="JSON file of OpenAI-format tool definitions")] = None,
    quant: QuantOpt = None,
    ctx: CtxOpt = None,
    kv_type: KvTypeOpt = None,
    gpu_mem: GpuMemOpt = None,
    ram: RamOpt = None,
    cpu_only: CpuOnlyOpt = False,
    ubatch: UbatchOpt = None,
    threads: ThreadsOpt = None,
    rpc: RpcOpt = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Limit per reply (default: the rest of the context)")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature (0 = greedy)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed")] = None,
    template: TemplateOpt = None,
    each_line: Annotated[bool, typer.Option("--each-line", help="Piped: each stdin line is a turn (default: all of stdin is one prompt)")] = False,
    resume: Annotated[bool, typer.Option("--resume", "-r", help="Continue the last chat (chats autosave to $GLMLOCAL_HOME/chats)")] = False,
    spec: SpecOpt = "auto",
    draft: DraftOpt = None,
) -> None:
    """Chat in the terminal (streamed Markdown, thinking, tool calls, speed). Piped stdin: plain-text answers."""
    from glmlocal.chat.run import ChatArgs, run_chat
    from glmlocal.engine.spec import SpecConfig
    from glmlocal.plan.options import PlanOptions

    plan = PlanOptions(ctx=ctx, kv_type=kv_type, gpu_mem=gpu_mem, ram=ram, cpu_only=cpu_only, threads=threads,
                       rpc=_endpoints(rpc), ubatch=ubatch)
    args = ChatArgs(model, plan, quant=quant, system=system, think=not no_think, think_budget=think_budget,
                    show_thinking=show_thinking,
                    tools=tools, max_tokens=max_tokens, temperature=temperature, seed=seed, template=template,
                    each_line=each_line, resume=resume, spec=SpecConfig(spec, draft))
    code = run_chat(args)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# serve (issue 5)
# ---------------------------------------------------------------------------------------------
@command()
def serve(
    model: Annotated[str, typer.Argument(help="Registry name (glm-4.6[:quant]), pulled model, or a .gguf path")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (non-loopback needs --api-key or --insecure)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port (0 picks a free one)")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="GLMLOCAL_API_KEY", help="Require this key (x-api-key or Authorization: Bearer)")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback --host without an API key, and any Host header (reverse proxies)")] = False,
    parallel: Annotated[Optional[int], typer.Option("--parallel", "-np", min=1, max=64, help="Requests decoded together, sharing the context's KV (default: one per 8K tokens of context, 1 to 8)")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests that may wait behind the running ones; more get 429")] = 16,
    cors: Annotated[Optional[list[str]], typer.Option("--cors", help="Allow browser requests from this origin (repeatable)")] = None,
    alias: Annotated[Optional[list[str]], typer.Option("--alias", help="Extra model name to answer to (repeatable)")] = None,
    thinking: Annotated[str, typer.Option("--thinking", metavar="MODE", help="request: as each request asks (Anthropic: only with `thinking`; OpenAI: on unless turned off); on or off: for every request")] = "request",
    think_budget: Annotated[Optional[int], typer.Option("--think-budget", metavar="N", min=1, help="Most tokens a turn may think when its request names no budget")] = None,
    no_think: Annotated[bool, typer.Option("--no-think", hidden=True, help="Same as --thinking off")] = False,
    quant: QuantOpt = None,
    ctx: CtxOpt = None,
    kv_type: KvTypeOpt = None,
    gpu_mem: GpuMemOpt = None,
    ram: RamOpt = None,
    cpu_only: CpuOnlyOpt = False,
    ubatch: UbatchOpt = None,
    threads: ThreadsOpt = None,
    rpc: RpcOpt = None,
    template: TemplateOpt = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level (info shows each request)")] = "warning",
    spec: SpecOpt = "auto",
    draft: DraftOpt = None,
) -> None:
    """Serve the model to IDE agents: OpenAI /v1/chat/completions and /v1/responses, Anthropic /v1/messages, on one port."""
    from glmlocal.engine.spec import SpecConfig
    from glmlocal.plan.options import PlanOptions
    from glmlocal.server.run import ServeArgs, run_serve

    plan = PlanOptions(ctx=ctx, kv_type=kv_type, gpu_mem=gpu_mem, ram=ram, cpu_only=cpu_only, threads=threads,
                       rpc=_endpoints(rpc), ubatch=ubatch)
    args = ServeArgs(model, host=host, port=port, api_key=api_key, insecure=insecure, max_queue=max_queue,
                     parallel=parallel, cors=tuple(cors or ()), aliases=tuple(alias or ()), quant=quant, template=template,
                     thinking="off" if no_think else thinking, think_budget=think_budget, log_level=log_level, plan=plan, spec=SpecConfig(spec, draft))
    code = run_serve(args)
    raise typer.Exit(code)


@command("rpc-server")
def rpc_server(
    endpoint: Annotated[str, typer.Argument(metavar="HOST:PORT", help="HOST:PORT to listen on, e.g. 0.0.0.0:50052")],
    threads: ThreadsOpt = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Keep large tensors sent by clients here, so a reload skips the transfer (llama.cpp rpc-server -c)")] = None,
) -> None:
    """Lend this machine's CPU to another machine's glmlocal (`--rpc HOST:PORT` there), as llama.cpp's rpc-server.
    Unauthenticated: anyone who can reach the port can use it, so bind a trusted network only."""
    from glmlocal.llama import rpc

    host = rpc.parse_endpoint(endpoint)[0]
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: {endpoint} is reachable from the network and the RPC protocol has no "
                    "authentication: use a trusted network only", fg=typer.colors.YELLOW, err=True)
    rpc.serve_rpc(endpoint, threads or 0, str(cache_dir) if cache_dir else None)


# ---------------------------------------------------------------------------------------------
# doctor (issue 3)
# ---------------------------------------------------------------------------------------------
@command()
def doctor(
    smoke_only: Annotated[bool, typer.Option("--smoke-only", help="Only the tiny quantized-model generation test (exit 0/1)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    cmake_args: Annotated[bool, typer.Option("--cmake-args", help="Print the CMAKE_ARGS for a llama-cpp-python build for this machine's GPU backend and CPU (why: on stderr)")] = False,
) -> None:
    """Check the llama.cpp build (backends, CPU kernels), GPUs, RAM and disk, and run a tiny model end to end."""
    if cmake_args:
        from glmlocal.doctor.build import choose_build

        choice = choose_build()
        typer.echo(f"glmlocal: {choice.reason}", err=True)
        typer.echo(choice.args)
        raise typer.Exit(0)
    from glmlocal.doctor.view import run_doctor

    raise typer.Exit(run_doctor(smoke_only=smoke_only, as_json=as_json))


def main() -> None:
    try:
        app(prog_name="glmlocal")  # `python -m glmlocal` is the same command: its usage lines say so
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
