"""Debug-only fault injection (env VLSERVE_FAULT_INJECT), off by default: fail chosen requests
inside the engine's inference step, so tests can prove one failure leaves the others intact."""

from __future__ import annotations

import threading

ENV_VAR = "VLSERVE_FAULT_INJECT"
# error: an ordinary exception in the step; oom: one the engine recognises as device OOM;
# crash: one that kills the inference thread (the server must then turn unhealthy and exit 1);
# hang: the step never returns, as a stuck device call (/health must then say "stalled")
_KINDS = {
    "error": "injected fault",
    "oom": "injected fault: out of memory",
    "crash": "injected fault: the inference thread dies",
    "hang": "injected fault: the step never returns",
}


class InjectedFault(RuntimeError):
    pass


class InjectedCrash(BaseException):
    """Not an Exception: nothing in the engine's per-step isolation catches it."""


class FaultInjector:
    """``KIND:USER``: the engine's ``before_prefill`` hook raises for every request whose
    ``user`` is USER. The route tells it which request ids those are (``track``), so no
    test-only field travels through the engine."""

    def __init__(self, kind: str, user: str) -> None:
        self.user = user
        self._error = InjectedCrash if kind == "crash" else InjectedFault
        self._hang = kind == "hang"
        self._message = _KINDS[kind]
        self._ids: set[str] = set()

    @classmethod
    def from_spec(cls, spec: str | None) -> FaultInjector | None:
        """None for an empty spec; raises ValueError for a malformed one."""
        if not spec:
            return None
        kind, sep, user = spec.partition(":")
        if not sep or kind not in _KINDS or not user:
            raise ValueError(
                f"{ENV_VAR} must be KIND:USER with KIND in {sorted(_KINDS)}, got {spec!r}"
            )
        return cls(kind, user)

    def track(self, request_id: str, user: str | None) -> None:
        if user == self.user:
            self._ids.add(request_id)

    def before_prefill(self, request_id: str) -> None:
        """The engine hook (inference thread)."""
        if request_id in self._ids:
            self._ids.discard(request_id)
            if self._hang:
                threading.Event().wait()  # forever: the thread is a daemon, exit ends it
            raise self._error(self._message)
