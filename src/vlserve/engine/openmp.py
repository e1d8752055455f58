"""OpenMP defaults for a process that serves: applied before torch loads its OpenMP runtime.

torch's CPU kernels run on an OpenMP team. libgomp's default wait policy lets an idle team member
spin for a while after each parallel region, so the cores stay busy between ops. In a serving
process the event loop, the media threads and the other thread's team need those cores, and
the spinning takes them: on two cores at c=32, ``OMP_WAIT_POLICY=PASSIVE`` (idle members sleep)
served 629 against 589 output tok/s and the in-process engine 836-895 against 733-820; c=1
and c=8 did not change (ARCHITECTURE.md, "What serving costs over the in-process engine").
A value the user set wins. Torch-free: it must run before ``import torch``.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_defaults() -> None:
    """Set each default the environment leaves unset; too late (and said so) once torch is in."""
    unset = {k: v for k, v in DEFAULTS.items() if k not in os.environ}
    if unset and "torch" in sys.modules:
        log.debug("torch is already loaded: %s would not take effect", ", ".join(unset))
        return
    os.environ.update(unset)


def describe() -> str:
    """The settings in effect, for the startup log: ``OMP_WAIT_POLICY=PASSIVE``."""
    return " ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in DEFAULTS)
