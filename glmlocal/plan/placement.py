"""What the planner decides: a Placement (flags for llama.cpp) and its per-device predictions (DevicePlan).

Plain data, shared by the planner that makes it, the engine that applies it and the CLI that shows it;
`glmlocal.plan.planner` re-exports both names, its public entry point.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DevicePlan:
    """Predicted bytes on one device, named as llama.cpp names it ("CUDA0", "RPC0", ... or "CPU")."""

    name: str
    weights: int
    kv: int
    compute: int
    capacity: int  # free VRAM, or available RAM
    layers: tuple[int, ...] = ()  # layer indices whose attention lives here
    expert_layers: tuple[int, ...] = ()  # layer indices with (some of) their routed experts here
    bandwidth: float = 0.0
    bytes_per_token: int = 0  # read per decoded token (active experts only)
    # CPU: the part of `weights` llama.cpp's CPU backend repacks into CPU_REPACK buffers (Footprint.repack).
    # Without mmap that is where those bytes live; with mmap it is an anonymous copy on top of the mapped
    # file, whose pages for those tensors are read once at load and then left to the page cache.
    repack: int = 0
    mtp: int = 0  # MTP's bytes here (NextN weights, its KV, the MTP context's buffers), on top of the others

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.mtp

    @property
    def headroom(self) -> int:
        return self.capacity - self.total


@dataclass(frozen=True)
class SpecEstimate:
    """Expected MTP speculative decoding with n_draft drafted tokens per step (glmlocal.plan.estimate)."""

    n_draft: int
    acceptance: float  # fraction of drafted tokens accepted (published, GLM-4.5-Air)
    tokens_per_step: float  # 1 + n_draft x acceptance
    step_cost: float  # a step's time in plain decode steps: verify 1 + n_draft tokens + n_draft MTP steps
    speedup: float  # tokens_per_step / step_cost
    tokens_per_s: float


@dataclass(frozen=True)
class Placement:
    """Everything llama.cpp needs to load the model as planned (see llama_cpp_flags())."""

    n_gpu_layers: int
    tensor_overrides: list[tuple[str, str]]
    tensor_split: list[float] | None
    main_gpu: int
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    n_batch: int
    n_ubatch: int
    n_threads: int
    use_mmap: bool
    devices: list[DevicePlan]
    est_tokens_per_s: float
    notes: list[str] = field(default_factory=list)
    model: str = ""
    op_offload: bool = True  # llama.cpp's op_offload (--no-op-offload turns it off)
    # MTP: load the NextN block (llama_model_params.load_mtp) so an MTP context can draft; its cost is in
    # devices[].mtp; mtp_draft is the draft count with the best expected speedup (mtp_estimates, one per count).
    mtp: bool = False
    mtp_draft: int = 0
    mtp_estimates: tuple[SpecEstimate, ...] = ()
    est_prompt_tokens_per_s: float = 0.0  # over a prompt_ref-token prompt, at n_ubatch
    est_ttft_s: float = 0.0  # seconds to process that prompt: the time to first token
    prompt_ref: int = 0
    parallel: int = 1  # serve's default --parallel: sequences sharing the n_ctx KV pool (planner.default_parallel)

    @classmethod
    def cpu_only(cls, ctx: int, threads: int, *, type_k: str = "f16", type_v: str = "f16",
                 n_batch: int = 512, n_ubatch: int = 512) -> Placement:
        """A placement with nothing offloaded (no prediction attached)."""
        return cls(0, [], None, 0, ctx, type_k, type_v, True, n_batch, n_ubatch, threads, True, [], 0.0,
                   ["CPU only"])

    def llama_cpp_flags(self) -> str:
        """The equivalent llama-server / llama-cli flags, shell-quoted (a -ot regex is pasted into a shell)."""
        flags = [f"-ngl {self.n_gpu_layers}"]
        if self.tensor_split:
            flags.append("-ts " + ",".join(f"{x:g}" for x in self.tensor_split))
            flags.append(f"-mg {self.main_gpu}")
        flags += [f"-ot {shlex.quote(f'{pattern}={buft}')}" for pattern, buft in self.tensor_overrides]
        flags += [f"-c {self.n_ctx}", f"-ctk {self.type_k}", f"-ctv {self.type_v}",
                  f"-fa {'on' if self.flash_attn else 'off'}", f"-b {self.n_batch}", f"-ub {self.n_ubatch}",
                  f"-t {self.n_threads}"]
        if not self.use_mmap:
            flags.append("--no-mmap")
        if not self.op_offload:
            flags.append("--no-op-offload")
        if self.mtp and self.mtp_draft:
            flags.append(f"--spec-type draft-mtp --spec-draft-n-max {self.mtp_draft}")
        return " ".join(flags)

    def to_dict(self) -> dict:
        """JSON-ready form (bytes as integers)."""
        d = asdict(self)
        d["llama_cpp_flags"] = self.llama_cpp_flags()
        return d
