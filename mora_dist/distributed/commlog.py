"""Recording every torch.distributed collective a process issues, with where it came from (diagnostics, tests).

Used to prove that MoRA gating is local (docs/design.md, Distribution): during MoRA forwards ZeRO-2 issues no
collective at all, and under ZeRO-3 the only ones are DeepSpeed's parameter gathers. ``install()`` must run
before DeepSpeed initialises its communication backend, which keeps references to the torch functions it will
call.
"""

from __future__ import annotations

import functools
import traceback
from collections import Counter

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced",
    "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast",
    "broadcast_object_list", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
    "isend", "irecv", "barrier", "all_reduce_coalesced", "batch_isend_irecv", "gather_object", "scatter_object_list",
)
# DeepSpeed's ZeRO-3 parameter fetching: the gathers themselves and the fetch coordinator's trace checks
ZERO3_FETCH_FILES = ("deepspeed/runtime/zero/partition_parameters.py",
                     "deepspeed/runtime/zero/partitioned_param_coordinator.py",
                     "deepspeed/runtime/zero/parameter_offload.py")


class CommLog:
    """Counts collectives per phase; the phase is set by the code under test (``with log.phase("forward")``)."""

    def __init__(self):
        self.current = "other"
        self.calls: Counter = Counter()  # (phase, op, origin) -> count
        self._depth = 0

    def phase(self, name: str):
        log = self

        class _Phase:
            def __enter__(self):
                self.prev, log.current = log.current, name

            def __exit__(self, *exc):
                log.current = self.prev

        return _Phase()

    def record(self, op: str) -> None:
        files = [f.filename.replace("\\", "/") for f in traceback.extract_stack()]
        origin = "deepspeed_zero3" if any(z in f for f in files for z in ZERO3_FETCH_FILES) else "other"
        self.calls[(self.current, op, origin)] += 1

    def summary(self) -> dict:
        """``{phase: {"op@origin": count}}``."""
        out: dict = {}
        for (phase, op, origin), n in sorted(self.calls.items()):
            out.setdefault(phase, {})[f"{op}@{origin}"] = n
        return out


LOG = CommLog()
_installed = False


def install() -> CommLog:
    """Wrap the collectives of ``torch.distributed`` (idempotent) so that every call is recorded in ``LOG``."""
    global _installed
    if _installed:
        return LOG
    for name in COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is None:
            continue

        def wrapper(*args, __fn=fn, __name=name, **kwargs):
            if LOG._depth == 0:  # count the outermost call only (some collectives call others)
                LOG.record(__name)
            LOG._depth += 1
            try:
                return __fn(*args, **kwargs)
            finally:
                LOG._depth -= 1

        functools.update_wrapper(wrapper, fn)
        setattr(c10d, name, wrapper)
        if getattr(dist, name, None) is fn:
            setattr(dist, name, wrapper)
    _installed = True
    return LOG
