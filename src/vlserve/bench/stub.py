"""A scripted OpenAI-compatible chat server with known delays and failures, for testing clients.

Run ``python -m vlserve.bench.stub --port 9000 --ttft-ms 50 --itl-ms 10`` to check a client (or
``vlserve bench`` itself) on a host without a model. Behaviour can be changed while it runs:
``POST /stub/config`` merges settings, ``POST /stub/script`` queues actions for the next requests
(``400``, ``429``, ``500``, ``503``, ``drop``, ``drop-mid``, ``error-chunk``, ``ok``), ``GET /stub/stats``
reports counts, the most requests ever in flight and arrival times, ``POST /stub/reset`` clears them.
With ``--record``, ``GET /stub/requests`` returns every request body with the answer it got; with
``--distinct``, every answer is tagged with its request's number (``r3·"t0"`` …), so that a
client that sends answers back (multi-turn conversations) can be checked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from aiohttp import web

ACTIONS = ("ok", "400", "429", "500", "503", "drop", "drop-mid", "error-chunk")


@dataclass(frozen=True)
class StubSettings:
    ttft_ms: float = 50.0  # request received → first token
    itl_ms: float = 0.0  # between tokens
    num_tokens: int | None = None  # None: the request's max_tokens
    usage: bool = True  # send usage (streaming: only when stream_options.include_usage)
    done: bool = True  # end streams with data: [DONE]
    keepalive: bool = False  # an SSE comment before every token
    crlf: bool = False  # \r\n line endings
    retry_after: str = "1"  # Retry-After header of scripted 429/503
    fail_every: int = 0  # every Nth request answers 500 (0: never)
    model: str = "stub-model"
    prompt_tokens: int = 10
    record: bool = False  # keep every request body and its answer for GET /stub/requests
    distinct: bool = False  # answers tagged with the request's number instead of "t0 t1 …"
    # per video_url part, reported as usage.prompt_tokens_details.video_tokens (0: omitted)
    video_tokens: int = 0


class StubServer:
    """State and handlers; ``app()`` builds the aiohttp application."""

    def __init__(self, settings: StubSettings | None = None) -> None:
        self.settings = settings or StubSettings()
        self.script: deque[str] = deque()
        self.reset()

    def reset(self) -> None:
        self.num_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrivals: list[float] = []
        self.request_ids: list[str | None] = []
        self.actions: list[str] = []
        self.records: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/stub/config", self.set_config)
        app.router.add_post("/stub/script", self.set_script)
        app.router.add_get("/stub/stats", self.stats)
        app.router.add_get("/stub/requests", self.requests)
        app.router.add_post("/stub/reset", self.do_reset)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.settings.model, "object": "model"}]}
        )

    async def set_config(self, request: web.Request) -> web.Response:
        known = {f.name for f in fields(StubSettings)}
        changes = {k: v for k, v in (await request.json()).items() if k in known}
        self.settings = replace(self.settings, **changes)
        return web.json_response(asdict(self.settings))

    async def set_script(self, request: web.Request) -> web.Response:
        actions = (await request.json())["actions"]
        bad = [a for a in actions if a not in ACTIONS]
        if bad:
            return web.json_response({"error": {"message": f"unknown actions {bad}"}}, status=400)
        self.script.extend(actions)
        return web.json_response({"queued": len(self.script)})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "num_requests": self.num_requests,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "arrivals": self.arrivals,
                "request_ids": self.request_ids,
                "actions": self.actions,
            }
        )

    async def requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.records})

    async def do_reset(self, request: web.Request) -> web.Response:
        self.reset()
        self.script.clear()
        return web.json_response({"ok": True})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.perf_counter())
        self.request_ids.append(request.headers.get("X-Request-Id"))
        self.num_requests += 1
        number = self.num_requests
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.json()
            action = self.script.popleft() if self.script else "ok"
            s = self.settings
            if action == "ok" and s.fail_every and self.num_requests % s.fail_every == 0:
                action = "500"
            self.actions.append(action)
            n = s.num_tokens if s.num_tokens is not None else int(body.get("max_tokens") or 16)
            tokens = [f'r{number}·"t{i}" ' if s.distinct else f"t{i} " for i in range(n)]
            if s.record:
                self.records.append(
                    {
                        "x_request_id": request.headers.get("X-Request-Id"),
                        "body": body,
                        "action": action,
                        "answer": "".join(tokens) if action == "ok" else None,
                    }
                )
            return await self._answer(request, body, action, tokens)
        except ConnectionResetError:  # the client went away (e.g. an interrupted benchmark)
            return web.Response(status=499)
        finally:
            self.in_flight -= 1

    async def _answer(
        self, request: web.Request, body: dict[str, Any], action: str, tokens: list[str]
    ) -> web.StreamResponse:
        s = self.settings
        if action in ("400", "429", "500", "503"):
            headers = {"Retry-After": s.retry_after} if action in ("429", "503") else {}
            error = {"error": {"message": f"scripted {action}", "type": "stub", "code": action}}
            return web.json_response(error, status=int(action), headers=headers)
        if action == "drop":
            _drop(request)
            return web.Response()
        await asyncio.sleep(s.ttft_ms / 1000.0)
        if not body.get("stream"):
            return web.json_response(self._completion(tokens, body))
        return await self._stream(request, body, action, tokens)

    async def _stream(
        self, request: web.Request, body: dict[str, Any], action: str, tokens: list[str]
    ) -> web.StreamResponse:
        s = self.settings
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        eol = "\r\n" if s.crlf else "\n"
        base = {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": s.model,
        }

        def frame(obj: Any) -> bytes:
            data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
            return f"data: {data}{eol}{eol}".encode()

        await resp.write(
            frame(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ],
                }
            )
        )
        n = len(tokens)
        for i in range(n):
            if i and s.itl_ms:
                await asyncio.sleep(s.itl_ms / 1000.0)
            if action == "drop-mid" and i == n // 2:
                _drop(request)
                return resp
            if action == "error-chunk" and i == n // 2:
                await resp.write(
                    frame({"error": {"message": "scripted error chunk", "type": "stub"}})
                )
                break
            if s.keepalive:
                await resp.write(f": keep-alive{eol}{eol}".encode())
            finish = ("length" if body.get("max_tokens") == n else "stop") if i == n - 1 else None
            delta = {"content": tokens[i]}
            await resp.write(
                frame({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        if s.usage and include_usage:
            await resp.write(frame({**base, "choices": [], "usage": self._usage(n, body)}))
        if s.done:
            await resp.write(frame("[DONE]"))
        await resp.write_eof()
        return resp

    def _completion(self, tokens: list[str], body: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        result: dict[str, Any] = {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": s.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(tokens),
                    },
                    "finish_reason": "length",
                }
            ],
        }
        if s.usage:
            result["usage"] = self._usage(len(tokens), body)
        return result

    def _usage(self, n: int, body: dict[str, Any]) -> dict[str, Any]:
        p = self.settings.prompt_tokens
        usage: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
        if self.settings.video_tokens:
            videos = sum(
                part.get("type") == "video_url"
                for message in body.get("messages") or ()
                if isinstance(message.get("content"), list)
                for part in message["content"]
                if isinstance(part, dict)
            )
            usage["prompt_tokens_details"] = {"video_tokens": videos * self.settings.video_tokens}
        return usage


def _drop(request: web.Request) -> None:
    """Close the connection under the handler, as a crashing server or a proxy would."""
    if request.transport is not None:
        request.transport.close()


async def serve(settings: StubSettings, host: str, port: int) -> None:
    """Serve until cancelled; print ``listening on PORT`` once bound (port 0 picks a free one)."""
    runner = web.AppRunner(StubServer(settings).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"listening on {bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


class StubProcess:
    """Run the stub in its own process (so its timing is not disturbed by the client's GIL).

    ``with StubProcess(ttft_ms=100) as stub: stub.url``; ``config``, ``script``, ``stats`` and
    ``reset`` drive it over HTTP while it runs.
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def __enter__(self) -> StubProcess:
        args = [sys.executable, "-m", "vlserve.bench.stub", "--port", "0"]
        for name, value in self.settings.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args += [flag, str(value)]
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        if self._proc.stdout is None:
            raise RuntimeError("the stub's stdout is not a pipe")
        line = self._proc.stdout.readline()
        if not line.startswith("listening on "):
            self.__exit__()
            raise RuntimeError(f"stub server did not start: {line!r}")
        self.port = int(line.split()[-1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _call(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def config(self, **changes: Any) -> dict[str, Any]:
        return self._call("/stub/config", changes)

    def script(self, *actions: str) -> None:
        self._call("/stub/script", {"actions": list(actions)})

    def stats(self) -> dict[str, Any]:
        return self._call("/stub/stats")

    def requests(self) -> list[dict[str, Any]]:
        """Bodies received and answers given, in arrival order (needs ``record=True``)."""
        return self._call("/stub/requests")["requests"]

    def reset(self, **settings: Any) -> None:
        """Clear counters and script, and restore the start-up settings plus ``settings``."""
        self._call("/stub/reset", {})
        self.config(**{**asdict(StubSettings()), **self.settings, **settings})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlserve.bench.stub", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    for f in fields(StubSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "num_tokens":
            parser.add_argument(flag, type=int, default=None)
        else:
            kind = {"float": float, "int": int}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default)
    args = vars(parser.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(StubSettings(**args), host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
