"""Fault injection for crash-safety tests: ``MORA_DIST_FAULT=NAME[#N][=ACTION]``.

At the N-th time (default 1st) the code passes ``fault_point(NAME)``, the process kills itself with SIGKILL
(``ACTION`` = ``KILL``, the default) or sends itself SIGTERM (``TERM``). Unset, a fault point costs one dict
lookup. The tests use it to crash a run at exact moments (inside a checkpoint write, between a stage's work
and its record) and prove that a rerun ends with the same results as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("MORA_DIST_FAULT")
    if not spec:
        return
    target, _, action = spec.partition("=")
    target, _, nth = target.partition("#")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGTERM if action.upper() == "TERM" else signal.SIGKILL)
