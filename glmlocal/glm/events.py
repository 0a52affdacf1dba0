"""Events produced by the streaming parser (one GLM assistant turn -> a flat event stream).

Ordering guarantees: a tool call is `ToolCallStart`, zero or more `ToolCallArgsDelta` for the same index, then
`ToolCallEnd`; calls never interleave. `ToolCallEnd` is the commit point: a call cut off by max tokens gets a
Start (and maybe some deltas) but never an End, so consumers that aggregate must keep only ended calls.
`Finish` is always last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the model's thinking (text inside <think>...</think>, tags removed)."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """A piece of the visible answer."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call began; `name` is complete. `id` is "call_<random>" (OpenAI style)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    """A fragment of the arguments JSON; the fragments of one call concatenate to a JSON object."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    """The call is complete; `arguments` equals json.loads of the concatenated deltas."""

    index: int
    name: str
    arguments: dict = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True)
class Finish:
    """End of the turn. "tool_calls" when at least one call completed and the model stopped by itself."""

    reason: FinishReason


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd | Finish


def coalesce(events: list[Event]) -> list[Event]:
    """Merge adjacent text deltas of the same kind (and same call index); used to compare event streams."""
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, (ReasoningDelta, ContentDelta)) and type(prev) is type(ev):
            out[-1] = type(ev)(prev.text + ev.text)  # type: ignore[union-attr]
        elif isinstance(ev, ToolCallArgsDelta) and isinstance(prev, ToolCallArgsDelta) and prev.index == ev.index:
            out[-1] = ToolCallArgsDelta(ev.index, prev.text + ev.text)
        else:
            out.append(ev)
    return out
