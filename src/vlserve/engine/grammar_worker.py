"""A grammar trial process: ``python -m vlserve.engine.grammar_worker`` (engine/grammar_pool.py).

Protocol, one JSON line each way: first the vocabulary (xgrammar's ``TokenizerInfo`` as JSON
text) in, ``ready`` out; then per trial ``{"kind": ..., "spec": ...}`` (a ``Guide``) in and
``{"ok": true}`` or ``{"error": "what is wrong"}`` out. The compiled grammar does not come back
(see grammar_pool.py for why); the parent is told whether, and so how fast, it compiles. It
exits when its input closes (the server is gone) or when it is killed.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    # the protocol owns the real stdout; anything a library prints goes to stderr
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import xgrammar as xgr

    from vlserve.engine.guided import describe_error, grammar_for
    from vlserve.engine.request import Guide

    source = sys.stdin.buffer
    compiler = xgr.GrammarCompiler(
        xgr.TokenizerInfo.deserialize_json(source.readline().decode()),
        max_threads=1,
        cache_enabled=False,
    )
    out.write(b"ready\n")
    for line in source:
        job = json.loads(line)
        try:
            compiler.compile_grammar(grammar_for(Guide(job["kind"], job["spec"])))
            reply: dict[str, object] = {"ok": True}
        except Exception as exc:  # a bad schema: what is wrong goes back as the answer
            reply = {"error": describe_error(exc)}
        out.write(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    main()
