"""Debug-only fault injection (env VLSERVE_FAULT_INJECT), off by default: fail chosen requests
inside the engine's inference step, so tests can prove one failure leaves the others intact."""

from __future__ import annotations

from collections.abc import Callable

from vlserve.engine.request import GenerationRequest

ENV_VAR = "VLSERVE_FAULT_INJECT"
# error: an ordinary exception in the step; oom: one the engine recognises as device OOM;
# crash: one that kills the inference thread (the server must then turn unhealthy and exit 1)
_KINDS = {
    "error": "injected fault",
    "oom": "injected fault: out of memory",
    "crash": "injected fault: the inference thread dies",
}


class InjectedFault(RuntimeError):
    pass


class InjectedCrash(BaseException):
    """Not an Exception: nothing in the engine's per-step isolation catches it."""


def fault_hook(spec: str | None) -> Callable[[GenerationRequest], None] | None:
    """``KIND:USER`` → a hook raising in the prefill of every request whose ``user`` is USER.

    Returns None for an empty spec; raises ValueError for a malformed one.
    """
    if not spec:
        return None
    kind, sep, user = spec.partition(":")
    if not sep or kind not in _KINDS or not user:
        raise ValueError(f"{ENV_VAR} must be KIND:USER with KIND in {sorted(_KINDS)}, got {spec!r}")
    message = _KINDS[kind]

    error = InjectedCrash if kind == "crash" else InjectedFault

    def hook(request: GenerationRequest) -> None:
        if request.user == user:
            raise error(message)

    return hook
