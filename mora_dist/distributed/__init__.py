"""Data-parallel MoRA: launcher discovery and world size (``env``), the few collectives (``collectives``), the
DeepSpeed engine (``engine``, the only importer of deepspeed) and trainer (``trainer``), bank changes that work
the same off and under ZeRO-3 (``bank``), all-reduced routing statistics and the cross-worker check of the pruning
decision (``stats``; the decision itself is ``mora_dist.mora.pruning``), and launch command generation
(``launch_cmd``)."""

from mora_dist.distributed.env import (
    DistributedEnvError, barrier, init_distributed, is_main, rank, shutdown, world_size,
)

__all__ = ["DistributedEnvError", "barrier", "init_distributed", "is_main", "rank", "shutdown",
           "world_size"]
