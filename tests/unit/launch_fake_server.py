"""A stand-in for `vlserve serve` in launch tests: /health, a chat endpoint with SSE, SIGTERM exit 0.

Run as a script; it accepts (and mostly ignores) the flags `vlserve launch` passes to a server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PINNING_VARS = (
    "ASCEND_RT_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "SERVER_PORT",
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-after-s", type=float, default=0.0)
    parser.add_argument("--exit-code", type=int, default=None, help="exit at once with this code")
    parser.add_argument("--ignore-sigterm", action="store_true")
    args, _ = parser.parse_known_args()
    if args.exit_code is not None:
        print(f"fake server exiting with {args.exit_code}", flush=True)
        return args.exit_code
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            ready = time.monotonic() - started >= args.ready_after_s
            env = {k: os.environ.get(k) for k in PINNING_VARS}
            body = {"status": "ok" if ready else "loading", "pid": os.getpid(), "env": env}
            self._send_json(200 if ready else 503, body)

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length) or b"{}")
            # A stand-in for generation time.
            delay_s = float(request.get("delay_s", 0.0))
            if not request.get("stream"):
                time.sleep(delay_s)
                message = {"role": "assistant", "content": f"hello from {os.getpid()}"}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                self._send_json(200, {"object": "chat.completion", "choices": [choice]})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(int(request.get("max_tokens", 5))):
                self.wfile.write(f"data: {json.dumps({'i': i, 'pid': os.getpid()})}\n\n".encode())
                self.wfile.flush()
                time.sleep(delay_s or 0.02)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

        def _send_json(self, status: int, body: Mapping[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        # shutdown() waits for serve_forever(), which runs on this very thread: call it elsewhere.
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"fake server {os.getpid()} on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
