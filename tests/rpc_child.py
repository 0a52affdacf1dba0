"""Plan + load + generate with local ggml RPC servers standing in for GPUs, in a process of its own.

Registering an RPC server is process-global (every later load in the process would see its devices as
GPUs), so tests run this as `python -m tests.rpc_child JSON` and read one JSON line back:

    {"gguf": path, "gpu_mib": [30, 30] | [] (CPU only), "ctx": 1024, "n_ubatch": 512,
     "op_offload": true, "use_mmap": false, "prompt": "...", "max_tokens": 16, "placement": "planned"}

It starts len(gpu_mib) RPC servers on 127.0.0.1 (free ports), plans with them as the GPUs (RPC0, RPC1, ...;
the budgets given, no margin) and prints the plan's per-device prediction, what llama.cpp logged (buffer
sizes per buffer, overridden tensors), the devices the engine chose and the greedy tokens (logits too).
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import replace

MIB = 2**20


def _plan(req: dict, names: list[str]):
    from glmlocal.plan.hardware import GIB, GPU, Hardware
    from glmlocal.plan.planner import footprint_from_gguf, plan

    if req.get("probe_rpc"):  # the product path: hardware.probe registers the servers (`--rpc HOST:PORT`)
        from glmlocal.plan.hardware import probe
        from glmlocal.plan.options import PlanOptions

        sizes = ",".join(f"{m}MiB" for m in req["gpu_mib"])
        machine = probe(PlanOptions(rpc=tuple(req["endpoints"]), gpu_mem=sizes, ram="16GiB", threads=2, cpu_bw=20))
        return plan(footprint_from_gguf(req["gguf"]), machine, ctx=req["ctx"], margin=0, mtp=False)

    names = [""] * len(names) if req.get("generic_names") else names  # as a `--gpu-mem` plan: CUDA0, CUDA1
    gpus = tuple(GPU(i, f"RPC server {i}", int(m * MIB), int(m * MIB), 50e9, device=name, op_offload=False)
                 for i, (m, name) in enumerate(zip(req["gpu_mib"], names)))
    machine = Hardware(gpus, 16 * GIB, 16 * GIB, 2, 20e9)
    p = plan(footprint_from_gguf(req["gguf"]), machine, ctx=req["ctx"], n_ubatch=req.get("n_ubatch", 512),
             margin=0, op_offload=req.get("op_offload", True), mtp=False)  # the trunk's placement; MTP: elsewhere
    p = replace(p, use_mmap=req.get("use_mmap", False), n_threads=1)
    if req.get("capacity_mib"):  # the same plan, on a machine whose first GPU has less free memory
        small = replace(p.devices[0], capacity=int(req["capacity_mib"] * MIB))
        p = replace(p, devices=[small, *p.devices[1:]])
    return p


def _without_repack() -> None:
    """Load with llama_model_params.use_extra_bufts off: no CPU_REPACK, so RAM weights use the same plain
    ggml-cpu kernels as the RPC server's buffers (the repacked Q4_K kernels sum in another order)."""
    from glmlocal.engine import engine

    plain = engine._model_params

    def patched(*args, **kwargs):
        mp = plain(*args, **kwargs)
        mp.use_extra_bufts = False
        return mp

    engine._model_params = patched


def run(req: dict) -> dict:
    import numpy as np

    if req.get("no_repack"):
        _without_repack()

    from glmlocal.engine.engine import Engine
    from glmlocal.engine.generation import Sampling
    from glmlocal.errors import GlmlocalError
    from glmlocal.llama import ggml, rpc
    from glmlocal.llama import log as llama_log

    with ExitStack() as stack:
        n_servers = req.get("servers", len(req["gpu_mib"]))
        servers = [stack.enter_context(rpc.RpcServer(threads=1)) for _ in range(n_servers)]
        req["endpoints"] = [s.endpoint for s in servers]
        names = [] if req.get("probe_rpc") else [n for s in servers for n in rpc.add_rpc_server(s.endpoint)]
        names += [f"RPC{i}" for i in range(len(names), len(req["gpu_mib"]))]  # planned, not running
        p = _plan(req, names)
        if req.get("naive"):  # no per-device plan: llama.cpp's own device list, everything offloaded
            from glmlocal.plan.planner import Placement

            p = replace(Placement.cpu_only(req["ctx"], 1), n_gpu_layers=999, use_mmap=False)
        out = {"devices": [{"name": d.name, "weights": d.weights, "kv": d.kv, "compute": d.compute,
                            "capacity": d.capacity, "repack": d.repack, "layers": list(d.layers),
                            "expert_layers": list(d.expert_layers)} for d in p.devices],
               "flags": p.llama_cpp_flags(), "overrides": p.tensor_overrides, "n_gpu_layers": p.n_gpu_layers,
               "gpu_devices": [d.name for d in ggml.gpu_devices()]}
        try:
            eng = stack.enter_context(Engine.load(req["gguf"], p))
        except GlmlocalError as e:
            return {**out, "error": type(e).__name__, "message": str(e)}
        prompt = eng.tokenize(req.get("prompt", "[gMASK]<sop><|user|>\nhello<|assistant|>"))
        no_eog = Sampling(temperature=0, logit_bias={t: float("-inf") for t in eng.eog_ids})
        outs = list(eng.generate(prompt, no_eog, max_tokens=req.get("max_tokens", 16), want_logits=True))
        first = np.asarray(outs[0].logits, dtype=np.float64)
        return {**out, "buffers": eng.report.buffers, "overridden": eng.report.overridden,
                "by_device": llama_log.buffers_by_device(eng.report.buffers),
                "engine_devices": eng.report.devices, "tokens": [o.token for o in outs],
                "first_logits": first.tolist(), "log": [ln for ln in eng.report.log if "buffer size" in ln]}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
