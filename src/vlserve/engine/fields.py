"""What an engine refusal is about, in the engine's own words.

The engine does not know which request field a client used (``max_tokens`` or
``max_completion_tokens`` for the same limit). Its errors carry ``field``, one of the names
below, and the API maps it to the request's field (api/plan.py, ``ResponsePlan.rename``).
``param`` keeps OpenAI's usual name for it, for callers that have no request to map from (the
benchmarks, the engine's own tests).
"""

from __future__ import annotations

from typing import TypeVar

from vlserve.errors import VLServeError

PROMPT = "prompt"  # the prompt as a whole: its messages, their media and the tools
OUTPUT_TOKENS = "output_tokens"  # the limit on each choice's generated tokens

# OpenAI's usual request field for each: the only request names the engine holds
_USUAL_PARAM = {PROMPT: "messages", OUTPUT_TOKENS: "max_tokens"}
_FIELD_OF_PARAM = {param: field for field, param in _USUAL_PARAM.items()}

E = TypeVar("E", bound=VLServeError)


def about(field: str, exc: E) -> E:
    """``exc`` marked as being about ``field``, its ``param`` the usual name of that field."""
    exc.field = field
    exc.param = _USUAL_PARAM[field]
    return exc


def field_of(exc: VLServeError) -> str | None:
    """The neutral field ``exc`` is about: its mark, else the field its ``param`` usually names
    (an engine that set only ``param``), else None."""
    field = exc.field
    if field is None and exc.param is not None:
        field = _FIELD_OF_PARAM.get(exc.param)
    return field
