"""Benchmark speculative decoding: decode tokens/s with and without drafts, same model, same run.

Workloads on the trained tiny GLM fixture (tests/fixtures/trained.py: a trunk that learnt a few standard-library
modules, and a NextN head trained the way GLM's MTP is):
  (a) free text: continue a 64-token window of the code it learnt for 128 tokens (what it writes on its own);
  (b) edit: re-emit a def/class block given in the prompt (the fixture's copy documents: "### textwrap.py
      <block> ### textwrap.py again, unchanged:"), where the prompt's block has one identifier renamed: the
      model writes the block as it learnt it, so its output is the prompt's code with a small change at every
      use of that name, the way an agent re-emits a file it was given with an edit.
Modes: off, ngram, mtp, mtp+ngram, auto, each an Engine of its own on the same GGUF, run interleaved (mode order
rotated every round) so that other load on the machine hits all of them alike; "off-again" is a second plain
engine, whose ratio to off shows how much of a difference is noise. Greedy; prompts evaluated cold
(KV reset), decode speed = (generated tokens - 1) / time from the first to the last token. auto keeps its
measurements across the run, as a server does. Reports tokens/s, the ratio to off, the acceptance rate and whether
each mode's tokens equal off's.

    python bench/spec.py [--model PATH.gguf] [--layout tiny45] [--quant bf16] [--rounds 3] [--prompts 6]
                         [--threads 1] [--draft N] [--modes off,ngram,...] [--json OUT]

Targets (issue #13, this fixture, a 2-core CPU): MTP acceptance >= 60%; ngram >= 1.5x decode tokens/s on (b);
auto >= 0.95x on (a) and (b).
"""

from __future__ import annotations

import argparse
import json
import keyword
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmlocal.engine.engine import Engine
from glmlocal.engine.generation import Sampling
from glmlocal.engine.spec import SpecConfig, decide
from glmlocal.plan.placement import Placement

MODES = ("off", "off-again", "ngram", "mtp", "mtp+ngram", "auto")  # off-again: a second plain engine (the noise)


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    same: int = 0
    runs: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    per_run: list[float] = field(default_factory=list)  # tokens/s of each (round, prompt), in order

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def workloads(eng: Engine, n: int, seed: int = 3) -> dict[str, list[tuple[list[int], int]]]:
    """(prompt tokens, most tokens to generate) for (a) free text and (b) the edit workload, from the trained
    fixture's corpus: (a) 64-token windows of the modules it learnt, continued for 128 tokens; (b) copy
    documents of def/class blocks of those modules with one name renamed in the prompt (the model re-emits the
    block, then ends)."""
    from tests.fixtures import trained_corpus as T

    rng = random.Random(seed)
    stream = [t for m in T.LM_MODULES for t in eng.tokenize(T.module_text(m))]
    free = [(stream[s:s + 64], 128) for s in (rng.randrange(len(stream) - 200) for _ in range(n))]
    blocks = [(f, b) for f, b in T.copy_blocks() if 300 < len(b) < 900]
    edit = []
    for f, b in rng.sample(blocks, min(len(blocks), n)):
        names = sorted({w for w in re.findall(r"\b[A-Za-z_]\w*\b", b) if len(w) > 3 and not keyword.iskeyword(w)})
        old = rng.choice(names)
        edit.append((eng.tokenize(T.copy_prompt(f, T.apply_rename(b, (old, old + "_x")))), len(eng.tokenize(b)) + 8))
    return {"free": free, "edit": edit}


def engines(path: Path, modes: list[str], threads: int, n_draft: int | None, ctx: int) -> dict[str, Engine]:
    plan = Placement.cpu_only(ctx=ctx, threads=threads)
    out = {}
    for mode in modes:
        plain = mode.startswith("off")
        setup = None if plain else decide(SpecConfig(mode, n_draft), has_nextn=True, planned_mtp=True)
        out[mode] = Engine.load(path, plan, spec=setup)
    return out


def run(path: Path, args: argparse.Namespace) -> dict:
    modes = args.modes.split(",")
    engs = engines(path, modes, args.threads, args.draft, args.ctx)
    greedy = Sampling(temperature=0)
    tallies = {(w, m): Tally() for w in ("free", "edit") for m in modes}
    try:
        for r in range(args.rounds):
            for w, ps in workloads(engs[modes[0]], args.prompts).items():
                for p, limit in ps:
                    order = modes[r % len(modes):] + modes[:r % len(modes)]
                    for m in order:
                        eng = engs[m]
                        eng.reset()
                        outs = list(eng.generate(p, greedy, max_tokens=limit))
                        st, t = outs[-1].stats, tallies[(w, m)]
                        toks = [o.token for o in outs if o.token is not None]
                        t.tokens += len(toks) - 1
                        t.seconds += st.decode_s
                        t.drafted += st.draft_n
                        t.accepted += st.draft_n_accepted
                        t.runs += 1
                        t.per_run.append((len(toks) - 1) / st.decode_s if st.decode_s else 0.0)
                        if r == 0:
                            t.outputs.append(toks)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        for (w, m), t in tallies.items():
            base = tallies[(w, "off")] if "off" in modes else None
            t.same = sum(a == b for a, b in zip(t.outputs, base.outputs)) if base else 0
        learnt = {m: engs[m].speculator.model.table() for m in modes if m == "auto"}
    finally:
        for e in engs.values():
            e.close()
    return report(tallies, modes, learnt)


def report(tallies: dict[tuple[str, str], Tally], modes: list[str], learnt: dict) -> dict:
    """vs off: total tokens / total time against off's; paired: the median over runs of the ratio to off's run of
    the same prompt in the same round (a burst of load from elsewhere spoils a few runs, not the median)."""
    rows = []
    print(f"{'workload':8} {'mode':10} {'tok/s':>8} {'vs off':>7} {'paired':>7} {'accepted':>16} {'same as off':>12}")
    for (w, m), t in tallies.items():
        off = tallies.get((w, "off"))
        ratio = t.tps / off.tps if off and off.tps else 0.0
        paired = statistics.median(a / b for a, b in zip(t.per_run, off.per_run) if b) if off else 0.0
        rate = t.accepted / t.drafted if t.drafted else 0.0
        print(f"{w:8} {m:10} {t.tps:8.1f} {ratio:6.2f}x {paired:6.2f}x {t.accepted:6d}/{t.drafted:<6d} {rate:4.0%} "
              f"{t.same:5d}/{len(t.outputs)}")
        rows.append({"workload": w, "mode": m, "tokens_per_s": round(t.tps, 1), "vs_off": round(ratio, 3),
                     "paired_vs_off": round(paired, 3), "drafted": t.drafted, "accepted": t.accepted,
                     "acceptance": round(rate, 3), "same_as_off": t.same, "prompts": len(t.outputs)})
    for m, table in learnt.items():
        print(f"{m} measured tok/s per arm: {table}")
    return {"rows": rows, "measured": learnt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF with a NextN layer (default: the trained fixture)")
    ap.add_argument("--layout", default="tiny45", choices=["tiny45", "tiny"])
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.model is None:
        from tests.conftest import build_cached_trained_gguf

        args.model = build_cached_trained_gguf(args.layout, args.quant)
    t0 = time.perf_counter()
    result = run(args.model, args)
    result.update(model=str(args.model), rounds=args.rounds, threads=args.threads,
                  seconds=round(time.perf_counter() - t0, 1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
