"""``tools``, ``tool_choice`` and ``response_format`` → what the template renders and the grammar
the engine enforces.

- ``tool_choice``: ``none`` renders the tools and parses nothing; ``auto`` (the default when
  tools are given) parses calls out of free text; ``required`` and a named function are forced
  by a grammar, so even a weak model writes a call whose arguments validate against the
  function's ``parameters``. ``required`` allows up to ``MAX_PARALLEL_CALLS`` calls (one with
  ``parallel_tool_calls: false``); a named function, one call.
- ``response_format``: ``json_object`` and ``json_schema`` become grammars; ``text`` is free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vlserve.api.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from vlserve.engine.request import Guide
from vlserve.errors import InvalidRequestError

# Qwen3-VL's call format (its chat template says so to the model)
CALL_BEGIN, CALL_END = "<tool_call>\n", "\n</tool_call>"
MAX_SCHEMA_CHARS = 100_000  # one schema as JSON text: bounds the grammar compiler's work
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays of a schema's JSON
# Forced calls per answer when parallel calls are allowed (OpenAI's default): a bound, because a
# weak model offered another call forever takes it until max_tokens.
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for rendering, decoding and parsing."""

    template_tools: list[dict[str, Any]] | None  # passed to the chat template
    guide: Guide | None  # the grammar forcing calls or a response format, if any
    parse_calls: bool  # parse ``<tool_call>`` blocks out of the output


def plan(req: ChatCompletionRequest) -> ToolPlan:
    choice = req.tool_choice
    tools = req.tools or []
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequestError(
            "tool_choice needs tools; give tools or leave tool_choice out", param="tool_choice"
        )
    for i, tool in enumerate(tools):
        _check_parameters(tool, f"tools[{i}].function.parameters")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools have duplicate function names", param="tools")
    forced: list[Tool] = []
    if isinstance(choice, NamedToolChoice):
        forced = [t for t in tools if t.function.name == choice.function.name]
        if not forced:
            raise InvalidRequestError(
                f"tool_choice names {choice.function.name!r}, which is not in tools "
                f"({', '.join(names)})",
                param="tool_choice",
            )
    elif choice == "required":
        forced = tools
    guide = response_guide(req)
    if forced:
        if guide is not None:
            raise InvalidRequestError(
                "response_format cannot be combined with a forced tool_choice",
                param="response_format",
            )
        parallel = choice == "required" and req.parallel_tool_calls is not False
        guide = call_guide(forced, MAX_PARALLEL_CALLS if parallel else 1)
    return ToolPlan(
        template_tools=[t.model_dump(exclude_none=True) for t in tools] or None,
        guide=guide,
        parse_calls=bool(tools) and choice != "none",
    )


def call_guide(tools: list[Tool], repeat: int) -> Guide:
    """1 to ``repeat`` calls of ``tools``: ``{"name": <one of them>, "arguments": <its
    parameters>}`` each."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    spec = {"begin": CALL_BEGIN, "end": CALL_END, "schema": schema, "repeat": repeat}
    # never sort_keys: the schema's property order is the order the output is written in
    return Guide("tagged_json", json.dumps(spec), param="tool_choice")


def response_guide(req: ChatCompletionRequest) -> Guide | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Guide("json_object")
    schema = fmt.json_schema.json_schema  # type: ignore[union-attr]
    if schema is None:  # OpenAI: no schema means any JSON object
        return Guide("json_object")
    return Guide("json_schema", _checked_text(schema, "response_format.json_schema.schema"))


def _check_parameters(tool: Tool, where: str) -> None:
    params = tool.function.parameters
    if params is None:
        return
    if params.get("type", "object") != "object":
        raise InvalidRequestError(
            f"{where} must be a JSON schema of an object (type 'object'), got type "
            f"{params.get('type')!r}",
            param=where,
        )
    _checked_text(params, where)


def _checked_text(schema: Any, where: str) -> str:
    """The schema as JSON text, once its size and nesting are within what compiles quickly
    (a schema nested 200 deep took 1.3 s to compile; the time budget comes after)."""
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            f"{where} is nested {depth} levels deep; at most {MAX_SCHEMA_DEPTH}", param=where
        )
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequestError(
            f"{where} is {len(text)} characters of JSON; at most {MAX_SCHEMA_CHARS}", param=where
        )
    return text


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_SCHEMA_DEPTH:  # deeper is refused anyway
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, depth + 1) for child in children)
    return deepest
