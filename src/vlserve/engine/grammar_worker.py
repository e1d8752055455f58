"""A grammar worker process (engine/grammar_pool.py): forked from multiprocessing's fork server,
which imported this module, and so xgrammar (and torch with it, about 9 s and 0.7 GB on two busy
cores), once; a worker starts in a fraction of a second and shares those pages.

Over its connection: the vocabulary (xgrammar's ``TokenizerInfo`` as JSON bytes) in, ``ready``
out; then per trial ``(kind, spec)`` (a ``Guide``) in and ``None`` (it compiles) or what is wrong
out. The compiled grammar does not come back (grammar_pool.py says why). It ends when the
connection closes or it is killed.
"""

from __future__ import annotations

import os
import threading
import time
from multiprocessing.connection import Connection

import xgrammar as xgr

from vlserve.engine.guided import describe_error, grammar_for
from vlserve.engine.request import Guide


def serve(conn: Connection, server_pid: int) -> None:
    threading.Thread(target=_exit_without, args=(server_pid,), daemon=True).start()
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



def _exit_without(server_pid: int) -> None:
    """Exit once the server is gone: one killed mid-compile must leave no worker compiling on
    (the compile releases the GIL, so this thread runs meanwhile). The fork server in between
    does not end its children, nor end while one runs."""
    stat = f"/proc/{server_pid}/stat"
    while True:
        time.sleep(0.5)
        try:
            with open(stat) as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    continue
        except OSError:
            pass
        os._exit(0)
