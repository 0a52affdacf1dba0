"""What a user may say about planning, in one type shared by `plan`, `chat`, `serve` and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlanOptions:
    """Planner inputs from the command line; None (or empty) lets the planner decide or the probe measure.

    gpu_mem "24GiB,24GiB" and ram "128GiB" plan for those sizes instead of this machine's; bandwidths are GB/s;
    rpc lists llama.cpp RPC servers (HOST:PORT) to register and use as GPUs (process-global: every later load
    in this process offloads to them); machine names a profile in machines.toml to plan for instead of this
    machine (`glmlocal plan MODEL --machine NAME`). ubatch fixes llama.cpp's n_ubatch (and n_batch) instead of
    the planner's choice; mtp None plans MTP when it fits and pays, True whenever it fits (--spec mtp), False
    never (--spec off / ngram: the NextN block is not loaded and its VRAM goes to experts);
    parallel sizes the contexts for that many sequences sharing the KV pool (None: the planner's default).
    """

    ctx: int | None = None
    kv_type: str | None = None
    gpu_mem: str | None = None
    ram: str | None = None
    cpu_only: bool = False
    threads: int | None = None
    gpu_bw: float | None = None
    cpu_bw: float | None = None
    rpc: tuple[str, ...] = ()
    machine: str | None = None
    ubatch: int | None = None
    mtp: bool | None = None
    parallel: int | None = None
