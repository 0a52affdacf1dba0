"""GLM-4.5 / 4.5-Air / 4.6 ("glm45") and GLM-4.7 ("glm47") chat protocol: the one place that knows it.

- `ChatTemplate`: messages + tools -> prompt text (official template byte for byte; sandboxed Jinja for others).
- `StreamParser`: generated text chunks -> reasoning / content / tool-call events.
- `tool_call_grammar` / `json_schema_grammar`: llama.cpp GBNF for forced tool calls and JSON answers.
"""

from glmlocal.glm.events import (
                                 ContentDelta,
                                 Event,
                                 Finish,
                                 FinishReason,
                                 ReasoningDelta,
                                 ToolCallArgsDelta,
                                 ToolCallEnd,
                                 ToolCallStart,
                                 coalesce,
)
from glmlocal.glm.parser import STOP_MARKERS, StreamParser, new_call_id
from glmlocal.glm.schema import convert_value, value_mode
from glmlocal.glm.template import (
                                 FAMILIES,
                                 ChatTemplate,
                                 builtin_source,
                                 content_text,
                                 is_glm_template,
                                 normalize_messages,
                                 normalize_tools,
                                 parse_arguments,
)
from glmlocal.glm.tools import chosen_functions, json_schema_grammar, tool_call_grammar

__all__ = [
                                 "FAMILIES",
                                 "STOP_MARKERS",
                                 "ChatTemplate",
                                 "ContentDelta",
                                 "Event",
                                 "Finish",
                                 "FinishReason",
                                 "ReasoningDelta",
                                 "StreamParser",
                                 "ToolCallArgsDelta",
                                 "ToolCallEnd",
                                 "ToolCallStart",
                                 "builtin_source",
                                 "chosen_functions",
                                 "coalesce",
                                 "content_text",
                                 "convert_value",
                                 "is_glm_template",
                                 "json_schema_grammar",
                                 "new_call_id",
                                 "normalize_messages",
                                 "normalize_tools",
                                 "parse_arguments",
                                 "tool_call_grammar",
                                 "value_mode",
]
