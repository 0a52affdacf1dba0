"""Speculative decoding policy: which drafts a sequence proposes each step, and when drafting is not worth it.

Sources: `ngram` (engine/ngram.py: continue a match found earlier in the prompt or the output), `mtp` (GLM's
NextN layer, engine/mtp.py), `mtp+ngram` (a long n-gram match first, MTP otherwise), `auto` (both where they
exist, measured), `off`. The decode loop (engine/batch.py) verifies drafts in the shared batch with each
sequence's own sampler chain and rolls the rest back, so what is emitted never depends on the drafts: greedy
output is plain decoding's, and at temperature > 0 every token is a sample of the target's distribution given
the accepted prefix (llama.cpp's common_sampler_sample_and_accept_n). Drafts only change the speed.

`auto` measures instead of assuming. Each way of stepping (no draft; n-gram drafts from long or from short
matches, capped at 4 / 16 / ...; MTP with k = 1..n drafts) is an arm whose tokens per second are measured on real
steps: the wall time from one drafting decision to the next (median: a burst of load elsewhere makes a few
steps slow, never fast), the tokens that step emitted (mean). The best arm is used when it beats plain steps by
a margin. Every arm is measured a few times at first (larger caps of a source only once the smaller came close)
and afresh when its measurements are old, at intervals that double while it keeps losing; plain steps are
re-measured more often, as every decision leans on them. So a machine where verifying k tokens costs about k
single steps (a MoE on a CPU) ends up not drafting, and one where it costs about one step ends up drafting.
When nothing is worth drafting, the next few steps do not even look, and an unused MTP context goes dormant
(engine/mtp.py). The measurements are engine-wide: every request benefits from what earlier ones learned.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import llama_cpp.llama_cpp as C

from glmlocal.engine.hooks import DraftSeq, Speculation
from glmlocal.engine.mtp import MtpContext
from glmlocal.engine.ngram import NgramConfig, NgramIndex
from glmlocal.errors import InputError

MODES = ("auto", "mtp", "ngram", "mtp+ngram", "off")
MTP_DRAFT = 3  # MTP drafts per step when neither --draft nor the plan says (llama.cpp's --spec-draft-n-max)
NGRAM_DRAFT = 16  # n-gram drafts per step by default (a copied span is usually right for a while)
DRAFT_LIMIT = 64  # --draft at most: a step verifies its drafts in one batch, and past this a miss costs more
LONG_MATCH = 6  # mtp+ngram: an n-gram match this long is trusted over MTP
NGRAM_CAPS = (4, 16, 64)  # auto: the n-gram draft lengths it measures separately
MEMO = 16  # auto: steps a decision is reused while only plain steps were measured
IDLE = 3  # auto: steps that do not look for drafts after one that found none worth verifying

Arm = tuple[str, int]  # (source, draft cap): ("off", 0), ("ngram", 16), ("mtp", 2)
OFF: Arm = ("off", 0)


@dataclass(frozen=True)
class SpecConfig:
    """What the user asked for: `--spec MODE` and `--draft N` (None: per source default)."""

    mode: str = "auto"
    n_draft: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown --spec {self.mode!r}", hint=f"use one of {', '.join(MODES)}")
        if self.n_draft is not None and (isinstance(self.n_draft, bool) or self.n_draft < 1):
            raise InputError(f"--draft must be at least 1, got {self.n_draft}", hint="or --spec off for no drafts")
        if self.n_draft is not None and self.n_draft > DRAFT_LIMIT:
            raise InputError(f"--draft must be at most {DRAFT_LIMIT}, got {self.n_draft}",
                             hint="a step verifies every draft in one batch; long drafts that miss cost time")

    @property
    def plan_mtp(self) -> bool | None:
        """PlanOptions.mtp: whether the planner must (True), may (None) or must not (False) load the NextN block."""
        return {"auto": None, "mtp": True, "mtp+ngram": True}.get(self.mode, False)


@dataclass(frozen=True)
class SpecSetup:
    """What runs, and why (the load panel and the server's start line print `describe()`)."""

    mode: str
    ngram: bool
    mtp: bool
    adaptive: bool
    n_mtp: int
    n_ngram: int
    why: str = ""

    @property
    def on(self) -> bool:
        return self.ngram or self.mtp

    def describe(self) -> str:
        if not self.on:
            return f"off{f' ({self.why})' if self.why else ''}"
        parts = ([f"MTP up to {self.n_mtp}"] if self.mtp else []) + ([f"n-gram up to {self.n_ngram}"] if self.ngram else [])
        text = f"{self.mode}: " + " + ".join(parts) + " drafts per step"
        if self.adaptive:
            text += ", measured: drafts only while they pay"
        return text + (f"; {self.why}" if self.why else "")


def decide(config: SpecConfig, *, has_nextn: bool, planned_mtp: bool, planned_draft: int = 0) -> SpecSetup:
    """What to run for `config` on a GGUF with/without a NextN layer and a plan that did/did not load it.
    Raises InputError for MTP asked of a GGUF without NextN, or of a plan with no room for it."""
    mode, n = config.mode, config.n_draft
    n_mtp, n_ngram = n or planned_draft or MTP_DRAFT, n or NGRAM_DRAFT
    if mode == "off":
        return SpecSetup(mode, False, False, False, 0, 0, "--spec off")
    wants_mtp = mode in ("mtp", "mtp+ngram")
    if wants_mtp and not has_nextn:
        raise InputError(f"--spec {mode}: this GGUF has no NextN (MTP) layer (converted with --no-mtp, or a "
                         "published quant without it)", hint="use --spec ngram")
    if wants_mtp and not planned_mtp:
        raise InputError(f"--spec {mode}: the plan has no room for the NextN (MTP) layer",
                         hint="use --spec ngram, or a smaller --ctx")
    if mode == "ngram":
        return SpecSetup(mode, True, False, False, 0, n_ngram)
    if mode != "auto":
        return SpecSetup(mode, mode == "mtp+ngram", True, False, n_mtp, n_ngram if mode == "mtp+ngram" else 0)
    why = "" if planned_mtp else ("no NextN layer in this GGUF" if not has_nextn
                                  else "MTP left out by the plan (no room, or it would not pay here)")
    return SpecSetup(mode, True, planned_mtp, True, n_mtp if planned_mtp else 0, n_ngram, why)


# --------------------------------------------------------------------------------------------- measuring
@dataclass
class _Samples:
    """The latest steps of one arm: seconds and tokens of each."""

    dt: deque[float] = field(default_factory=deque)
    n: deque[float] = field(default_factory=deque)
    last: int = 0  # the step of the latest sample
    misses: int = 0  # re-measurements in a row after which it still did not pay (each doubles the wait)
    again: bool = False  # being re-measured
    _rate: float | None = None

    def add(self, dt: float, n: float, window: int) -> None:
        self.dt.append(dt), self.n.append(n)
        if len(self.dt) > window:
            self.drop()
        self._rate = None

    def drop(self) -> None:
        self.dt.popleft(), self.n.popleft()
        self._rate = None

    def rate(self) -> float:
        """Mean tokens per step over the median step time: a step's yield is exact, its time is noisy (another
        process on the same cores makes a few steps many times slower, never faster)."""
        if self._rate is None:
            self._rate = sum(self.n) / len(self.n) / statistics.median(self.dt)
        return self._rate


@dataclass
class CostModel:
    """Tokens per second of each arm, from the latest `window` steps it ran; pure (times are given).

    An arm is measured `min_samples` times before it is judged, the larger draft caps of a source only once the
    next smaller one came within `gate` of plain steps (a source that loses at 1 draft is not tried at 3), and
    measured afresh after `reprobe` steps without a sample (plain steps after `reprobe_off`, as every decision
    leans on them), a wait that doubles, up to 16 times, each time it still loses: probing costs a few slow
    steps early and almost nothing later."""

    window: int = 16
    min_samples: int = 3
    reprobe: int = 256
    reprobe_off: int = 32
    margin: float = 0.05  # an arm must beat plain steps by this fraction
    gate: float = 0.9
    step: int = 0
    _arms: dict[Arm, _Samples] = field(default_factory=dict)
    # Decisions per set of options, kept while nothing but plain steps was measured (at most MEMO steps, and
    # never past an arm's next measurement): a step must cost microseconds, not a walk over every arm.
    _memo: dict[tuple[Arm, ...], Arm] = field(default_factory=dict)
    _pays: dict[str, bool] = field(default_factory=dict)
    _memo_until: int = 0

    def observe(self, arm: Arm, dt: float, n: float) -> None:
        s = self._arms.get(arm)
        if s is None:
            s = self._arms[arm] = _Samples()
        s.add(max(dt, 1e-9), n, self.window)
        s.last = self.step
        if arm != OFF:
            self._memo_until = 0

    def rate(self, arm: Arm) -> float | None:
        """Tokens per second (None: fewer than min_samples steps measured)."""
        s = self._arms.get(arm)
        if s is None or len(s.dt) < self.min_samples:
            return None
        return s.rate()

    def choose(self, options: Sequence[Arm]) -> Arm:
        """The arm for this step among `options` (OFF is always possible): one due for a measurement, else the
        fastest when it beats OFF by the margin, else OFF."""
        self.step += 1
        if not options:
            return OFF
        key = tuple(options)
        if self.step < self._memo_until and key in self._memo:
            return self._memo[key]
        for arm in (OFF, *options):
            if self._open(arm) and self._due(arm):
                self._memo_until = 0
                return arm
        best = max(options, key=lambda a: self.rate(a) or 0.0)
        pick = best if (self.rate(best) or 0.0) > (self.rate(OFF) or 0.0) * (1 + self.margin) else OFF
        for arm in (OFF, *options):
            s = self._arms.get(arm)
            if s is not None and s.again:  # a re-measurement just completed
                s.again, s.misses = False, 0 if arm == pick else s.misses + 1
        if self.step >= self._memo_until:
            self._memo.clear(), self._pays.clear()
            due = [s.last + self._wait(a, s) + 1 for a, s in self._arms.items() if len(s.dt) >= self.min_samples]
            self._memo_until = min([self.step + MEMO, *due])
        self._memo[key] = pick
        return pick

    def _wait(self, arm: Arm, s: _Samples) -> int:
        """Steps without a sample after which arm is measured afresh."""
        return (self.reprobe_off if arm == OFF else self.reprobe) << min(s.misses, 4)

    def _due(self, arm: Arm) -> bool:
        s = self._arms.get(arm)
        if s is None or len(s.dt) < self.min_samples:
            return True
        if self.step - s.last <= self._wait(arm, s):
            return False
        while s.dt:  # measured afresh: old samples may hold a burst of load that is long gone
            s.drop()
        s.again = True
        return True

    def _open(self, arm: Arm) -> bool:
        """Whether arm may be measured: OFF and a source's smallest cap always, a larger cap when the next
        smaller cap measured came within `gate` of OFF."""
        smaller = [a for a in self._arms if a[0] == arm[0] and a[1] < arm[1]]
        if arm == OFF or not smaller:
            return True
        below, off = self.rate(max(smaller)), self.rate(OFF)
        return below is not None and off is not None and below >= self.gate * off

    def pays(self, source: str) -> bool:
        """Whether drafts from `source` are in use or still to be measured (a larger cap its gate keeps closed
        does not count)."""
        if self.step < self._memo_until and source in self._pays:
            return self._pays[source]
        arms = [a for a in self._arms if a[0] == source]
        off = self.rate(OFF)
        yes = not arms or any(self.rate(a) is None and self._open(a) for a in arms) or off is None or \
            max(self.rate(a) or 0.0 for a in arms) > off * (1 + self.margin)
        self._pays[source] = yes
        return yes

    def table(self) -> dict[str, float]:
        """Measured tokens/s per arm ("ngram<=16": ..., "ngram-short<=4": n-gram drafts from short matches)."""
        return {("off" if a == OFF else f"{a[0]}<={a[1]}"): round(r, 1)
                for a in sorted(self._arms) if (r := self.rate(a)) is not None}


# --------------------------------------------------------------------------------------------- drafting
@dataclass
class SourceStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0


class Speculator:
    """Speculative decoding for one engine: builds each request's Speculation, keeps the measurements."""

    def __init__(self, setup: SpecSetup, mtp: MtpContext | None, ngram: NgramConfig = NgramConfig(),
                 model: CostModel | None = None):
        if setup.mtp and mtp is None:
            raise ValueError("an MTP setup needs an MtpContext")
        # a match is measured as far back as drafts may reach: --draft 32 drafts 32 tokens of a long copy
        self.setup, self.mtp = setup, mtp if setup.mtp else None
        self.ngram = replace(ngram, key_max=max(ngram.key_max, setup.n_ngram))
        self.model = model or CostModel()
        self.stats: dict[str, SourceStats] = {"mtp": SourceStats(), "ngram": SourceStats()}
        self._caps = [c for c in NGRAM_CAPS if c <= setup.n_ngram] or [setup.n_ngram]
        self._mtp_arms = [("mtp", k) for k in range(1, setup.n_mtp + 1)]

    def speculation(self, prompt: Sequence[int] = ()) -> Speculation | None:
        """A new request's Speculation (None when speculation is off); its n-gram index starts with `prompt`."""
        if not self.setup.on:
            return None
        return Speculation(_Drafter(self, prompt), max(self.setup.n_mtp, self.setup.n_ngram))

    def propose(self, seq: DraftSeq, n_max: int, index: NgramIndex | None) -> tuple[Arm, list[int]]:
        """This step's arm and drafts for seq (at most n_max)."""
        found = index.find(seq.history, min(n_max, self.setup.n_ngram)) if index is not None else None
        k_mtp = min(n_max, self.setup.n_mtp) if self.mtp is not None else 0
        if not self.setup.adaptive:
            if found and (not k_mtp or found.match >= LONG_MATCH):
                return ("ngram", len(found.tokens)), found.tokens
            return self._mtp(seq, k_mtp) if k_mtp else (OFF, [])
        options: list[Arm] = []
        if found:  # long matches (copied code) and short ones (a phrase seen before) are measured apart
            src, caps = "ngram" if found.match >= LONG_MATCH else "ngram-short", self._caps
            options += [(src, c) for c in caps if c < len(found.tokens)]
            options.append((src, next((c for c in caps if c >= len(found.tokens)), caps[-1])))
        options += self._mtp_arms[:k_mtp]
        arm = self.model.choose(options)
        if self.mtp is not None:
            self.mtp.keep_up = self.model.pays("mtp")
        if arm[0] != "mtp" and arm != OFF and found:
            return arm, found.tokens[:arm[1]]
        if arm[0] == "mtp":
            return self._mtp(seq, arm[1])
        return OFF, []

    def _mtp(self, seq: DraftSeq, k: int) -> tuple[Arm, list[int]]:
        drafts = self.mtp.draft(seq.seq_id, seq.history[-1], seq.n_past, k) if self.mtp is not None else []
        return (("mtp", k), drafts) if drafts else (OFF, [])

    def record(self, source: str, n_drafted: int, n_accepted: int) -> None:
        st = self.stats["mtp" if source == "mtp" else "ngram"]
        st.steps, st.drafted, st.accepted = st.steps + 1, st.drafted + n_drafted, st.accepted + n_accepted


class _Drafter:
    """One request's drafter (engine/hooks.py Drafter): its n-gram index over prompt + output, and the timing
    of its steps for the cost model. Under auto, a step that drafts nothing is followed by IDLE steps that do
    not even look (a copy that starts is caught a few tokens late; plain steps run at plain speed)."""

    def __init__(self, spec: Speculator, prompt: Sequence[int] = ()):
        self._spec = spec
        self._index = NgramIndex(spec.ngram) if spec.setup.ngram else None
        if self._index is not None:  # indexed on the caller's thread: a long prompt never stalls the decode loop
            self._index.extend(prompt)
        self._arm: Arm | None = None
        self._t, self._n, self._step = 0.0, 0, -2
        self._idle = 0

    def draft(self, seq: DraftSeq, n_max: int) -> list[int]:
        now = time.perf_counter()
        # the previous decision's step ends here: its time and tokens, measured only when it was the loop's step
        # right before this one (not held back behind a slow reader) and carried no prompt chunk
        if self._arm is not None and seq.step == self._step + 1 and not seq.after_prefill:
            self._spec.model.observe(self._arm, now - self._t, len(seq.history) - self._n)
        self._t, self._n, self._step = now, len(seq.history), seq.step
        if self._idle:
            self._idle, self._arm = self._idle - 1, None
            return []
        self._arm, drafts = self._spec.propose(seq, n_max, self._index)
        if self._arm == OFF and self._spec.setup.adaptive:
            self._idle = IDLE
        return drafts

    def on_accept(self, seq: DraftSeq, tokens: Sequence[int], n_drafted: int, n_accepted: int) -> None:
        if self._arm is not None and self._arm != OFF:
            self._spec.record(self._arm[0], n_drafted, n_accepted)

    def reset(self, seq: DraftSeq) -> None:
        self._arm = None


def start_speculation(setup: SpecSetup | None, model: C.llama_model_p, ctx: C.llama_context_p,
                      mtp_params: C.llama_context_params | None) -> Speculator | None:
    """An engine's Speculator for `setup` (None when off): with MTP, the MTP context beside `ctx` made from
    `mtp_params` (engine/params.py mtp_context_params; the model must have been loaded with load_mtp)."""
    if setup is None or not setup.on:
        return None
    if setup.mtp and mtp_params is None:
        raise ValueError("MTP drafting needs the MTP context's parameters")
    mtp = MtpContext.open(model, ctx, mtp_params, loaded_mtp=True) if setup.mtp else None
    return Speculator(setup, mtp)
