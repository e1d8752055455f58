"""A grammar worker process (engine/grammar_pool.py): forked from multiprocessing's fork server,
which imported this module, and so xgrammar (and torch with it, about 9 s and 0.7 GB on two busy
cores), once; a worker starts in a fraction of a second and shares those pages.

Over its connection: the vocabulary (xgrammar's ``TokenizerInfo`` as JSON bytes) in, ``ready``
out; then per trial ``(kind, spec)`` (a ``Guide``) in and ``None`` (it compiles) or what is wrong
out. The compiled grammar does not come back (grammar_pool.py says why). It ends when the
connection closes or it is killed.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

import xgrammar as xgr

from vlserve.engine.guided import describe_error, grammar_for
from vlserve.engine.request import Guide


def serve(conn: Connection) -> None:
    info = xgr.TokenizerInfo.deserialize_json(conn.recv_bytes().decode())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    conn.send("ready")
    while True:
        try:
            kind, spec = conn.recv()
        except EOFError:
            return
        try:
            compiler.compile_grammar(grammar_for(Guide(kind, spec)))
            conn.send(None)
        except Exception as exc:  # a bad schema: what is wrong goes back as the answer
            conn.send(describe_error(exc))
