"""Keep child processes alive: start, wait for /health, restart with backoff, stop in order.

Crashes and hangs are restarted alike: a child that stops answering /health after it was ready
(see ``health.py`` for what counts) is killed and then follows the same backoff as a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlserve.aio import within
from vlserve.errors import VLServeError
from vlserve.launch.health import HungDetector, Probe, is_stopped, probe_status
from vlserve.launch.health import probe_health as probe_health  # re-exported: tests, benchmarks

logger = logging.getLogger("vlserve.launch")


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised child; ``env`` is its complete environment."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_path: Path
    # Ready once this URL answers 200; without one, ready as soon as it is started.
    health_url: str | None = None
    stop_signal: int = signal.SIGTERM
    # Kill and restart it when, once ready, its health_url stops answering (RestartPolicy).
    restart_if_hung: bool = True


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    # A child that ran this long after being ready starts over from the initial backoff.
    stable_after_s: float = 60.0
    # Crashing this many times in a row without ever becoming ready is fatal (bad model path,
    # device held by someone else): restarting forever would only hide it.
    max_startup_failures: int = 3
    # /health is polled this often, while starting and after; each probe may take this long.
    health_interval_s: float = 2.0
    health_timeout_s: float = 5.0
    # This many probes in a row without an answer, after the child was ready, make it hung
    # (0: never). It is then killed: SIGKILL at once if stopped, else SIGTERM and, after
    # hung_kill_grace_s, SIGKILL.
    hung_after: int = 3
    hung_kill_grace_s: float = 5.0
    stop_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.max_startup_failures < 1:
            raise ValueError("max_startup_failures must be at least 1")
        if min(self.health_interval_s, self.health_timeout_s, self.hung_kill_grace_s) <= 0:
            raise ValueError(
                "health_interval_s, health_timeout_s and hung_kill_grace_s must be > 0"
            )
        if self.hung_after < 0:
            raise ValueError("hung_after must be 0 (off) or more")


class ChildState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class _Child:
    spec: ProcessSpec
    state: ChildState = ChildState.STARTING
    proc: asyncio.subprocess.Process | None = None
    num_starts: int = 0
    num_hung: int = 0
    # Set when the current process was killed for being hung, cleared at each spawn.
    hung: bool = False
    started_at: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Supervisor:
    """Runs children on the current event loop; ``stop`` drains them group by group."""

    def __init__(self, policy: RestartPolicy, probe: Probe = probe_status) -> None:
        self.policy = policy
        self._probe = probe
        self._children: dict[str, _Child] = {}
        self._stopping = asyncio.Event()
        self._failed = asyncio.Event()

    def start(self, spec: ProcessSpec) -> None:
        if spec.name in self._children:
            raise ValueError(f"duplicate child name: {spec.name}")
        child = _Child(spec)
        self._children[spec.name] = child
        child.task = asyncio.get_running_loop().create_task(self._keep_alive(child))

    def states(self) -> dict[str, ChildState]:
        return {name: child.state for name, child in self._children.items()}

    def pid(self, name: str) -> int | None:
        proc = self._children[name].proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def num_starts(self, name: str) -> int:
        return self._children[name].num_starts

    def num_hung(self, name: str) -> int:
        """How many times this child was killed for being hung."""
        return self._children[name].num_hung

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stop_requested(self) -> bool:
        return self._stopping.is_set()

    async def wait_ready(self, names: Iterable[str], timeout_s: float) -> None:
        """Return once every named child answers its health check; raise if that cannot happen."""
        names = list(names)
        waits = [asyncio.ensure_future(self._children[n].ready.wait()) for n in names]
        all_ready: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*waits))
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        failed: asyncio.Future[Any] = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait(
                {all_ready, stop, failed}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for fut in (all_ready, stop, failed):
                fut.cancel()
        if self._failed.is_set():
            raise VLServeError(f"gave up on: {', '.join(self._names_in(ChildState.FAILED))}")
        if self._stopping.is_set():
            raise VLServeError("stop requested before everything was ready")
        if not all(self._children[n].ready.is_set() for n in names):
            late = [n for n in names if not self._children[n].ready.is_set()]
            raise VLServeError(f"not ready after {timeout_s:g} s: {', '.join(late)}")

    async def wait_stop_or_failure(self) -> bool:
        """Block until a stop is requested (True) or a child is given up on (False)."""
        stop = asyncio.ensure_future(self._stopping.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        failed.cancel()
        return not self._failed.is_set()

    async def stop(self, order: Sequence[Sequence[str]] = ()) -> None:
        """Stop all children: each group of ``order`` together, groups one after the other."""
        self._stopping.set()
        listed = {name for group in order for name in group}
        rest = [name for name in self._children if name not in listed]
        for group in [*order, rest]:
            children = [self._children[n] for n in group if n in self._children]
            await asyncio.gather(*(self._stop_child(c) for c in children))
        tasks = [c.task for c in self._children.values() if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_alive(self, child: _Child) -> None:
        policy = self.policy
        backoff_s = policy.initial_backoff_s
        failures_in_a_row = 0
        while not self._stopping.is_set():
            await self._spawn(child)
            if self._stopping.is_set():
                # stop() ran while we were spawning and could not see this process yet.
                await self._stop_child(child)
                break
            became_ready = await self._watch(child)
            if self._stopping.is_set():
                break
            uptime_s = time.monotonic() - child.started_at
            failures_in_a_row = 0 if became_ready else failures_in_a_row + 1
            if became_ready and uptime_s >= policy.stable_after_s:
                backoff_s = policy.initial_backoff_s
            code = child.proc.returncode if child.proc is not None else None
            tail = _log_tail(child.spec.log_path)
            if failures_in_a_row >= policy.max_startup_failures:
                logger.error(
                    "%s exited with code %s %d times in a row before becoming ready; giving up. "
                    "Last lines of %s:\n%s",
                    child.spec.name, code, failures_in_a_row, child.spec.log_path, tail,
                )  # fmt: skip
                child.state = ChildState.FAILED
                self._failed.set()
                return
            how = "was hung and killed (exit code %s)" if child.hung else "exited with code %s"
            logger.warning(
                "%s " + how + " after %.1f s; restarting in %.1f s. Last lines of %s:\n%s",
                child.spec.name, code, uptime_s, backoff_s, child.spec.log_path, tail,
            )  # fmt: skip
            child.state = ChildState.BACKOFF
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._stopping.wait(), backoff_s)
            backoff_s = min(backoff_s * 2, policy.max_backoff_s)
        child.state = ChildState.STOPPED

    async def _spawn(self, child: _Child) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        child.num_starts += 1
        with spec.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== {stamp} start #{child.num_starts}: {' '.join(spec.argv)}\n".encode())
            log.flush()
            # Own session: a Ctrl-C in the terminal reaches only us, and we stop children in order.
            child.proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=dict(spec.env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        child.started_at = time.monotonic()
        child.hung = False
        child.state = ChildState.STARTING
        child.ready.clear()
        logger.info("%s started (pid %d, start #%d)", spec.name, child.proc.pid, child.num_starts)

    async def _watch(self, child: _Child) -> bool:
        """Wait for the child to exit; meanwhile mark it ready once healthy. True if it was.

        After readiness, a child that stops answering /health is killed (it then exits).
        """
        if child.proc is None:
            return False
        exited = asyncio.ensure_future(child.proc.wait())
        if not await self._wait_until_ready(child, exited):
            return False
        spec = child.spec
        if spec.health_url is not None and spec.restart_if_hung and self.policy.hung_after > 0:
            await self._watch_liveness(child, spec.health_url, exited)
        await exited
        return True

    async def _wait_until_ready(self, child: _Child, exited: asyncio.Future[int]) -> bool:
        """Poll /health until 200 (True) or the child exits (False). No hang rule here: loading
        may keep a server silent for minutes, and crashes while starting are counted already."""
        url, policy = child.spec.health_url, self.policy
        while not exited.done():
            if url is None or await self._probe(url, policy.health_timeout_s) == 200:
                child.state = ChildState.READY
                child.ready.set()
                waited_s = time.monotonic() - child.started_at
                logger.info("%s ready after %.1f s", child.spec.name, waited_s)
                return True
            await asyncio.wait({exited}, timeout=policy.health_interval_s)
        return False

    async def _watch_liveness(self, child: _Child, url: str, exited: asyncio.Future[int]) -> None:
        """Probe until the child exits or a stop begins (a drain closes the port on purpose);
        kill it if ``hung_after`` probes in a row get no answer."""
        policy = self.policy
        detector = HungDetector(policy.hung_after)
        silent_since = time.monotonic()
        while True:
            await asyncio.wait({exited}, timeout=policy.health_interval_s)
            if exited.done() or self._stopping.is_set():
                return
            status = await self._probe(url, policy.health_timeout_s)
            if exited.done() or self._stopping.is_set():
                return
            if status is not None:
                silent_since = time.monotonic()
            if detector.record(status):
                break
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        stopped = is_stopped(proc.pid)
        logger.error(
            "%s is hung: %d health checks in a row without an answer or with a stalled engine "
            "(%.1f s, timeout %g s each)"
            "; pid %d%s, killing it and restarting",
            child.spec.name, detector.failures_in_a_row, time.monotonic() - silent_since,
            policy.health_timeout_s, proc.pid, " is stopped (SIGSTOP)" if stopped else "",
        )  # fmt: skip
        child.hung = True
        child.num_hung += 1
        await self._kill_hung(proc, child.spec.stop_signal, stopped)

    async def _kill_hung(
        self, proc: asyncio.subprocess.Process, stop_signal: int, stopped: bool
    ) -> None:
        """SIGKILL a stopped child at once (SIGTERM would wait for a SIGCONT that never comes);
        otherwise SIGTERM, and SIGKILL to its process group after a short grace."""
        if not stopped:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(stop_signal)
            with contextlib.suppress(asyncio.TimeoutError):
                await within(proc.wait(), self.policy.hung_kill_grace_s)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    async def _stop_child(self, child: _Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(child.spec.stop_signal)
            if is_stopped(proc.pid):
                # A stopped process only handles its stop signal once continued.
                os.kill(proc.pid, signal.SIGCONT)
        try:
            await within(proc.wait(), self.policy.stop_timeout_s)
        except asyncio.TimeoutError:
            logger.warning(
                "%s did not stop within %g s; killing it",
                child.spec.name,
                self.policy.stop_timeout_s,
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        logger.info("%s stopped (exit code %s)", child.spec.name, proc.returncode)

    def _names_in(self, state: ChildState) -> list[str]:
        return [name for name, child in self._children.items() if child.state is state]


def _log_tail(path: Path, num_lines: int = 20) -> str:
    try:
        with path.open("rb") as f:
            lines = deque(f, maxlen=num_lines)
    except OSError:
        return "(no log)"
    return b"".join(lines).decode(errors="replace").rstrip()


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has Linux send SIGTERM to the child if we die without stopping it.

    Orphaned servers would keep holding their NPUs, which is what this command exists to avoid.
    libc is resolved here, before fork, so that the child only makes one system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec
