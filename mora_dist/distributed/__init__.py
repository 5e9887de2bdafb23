"""Data-parallel MoRA: launcher discovery (``env``), the DeepSpeed engine (``engine``, the only importer of
deepspeed), all-reduced routing statistics and the cross-worker check of the pruning decision (``stats``; the
decision itself is ``mora_dist.mora.pruning``), and launch command generation (``launch_cmd``)."""

from mora_dist.distributed.env import (
    DistributedEnvError, barrier, init_distributed, is_main, rank, shutdown, world_size,
)

__all__ = ["DistributedEnvError", "barrier", "init_distributed", "is_main", "rank", "shutdown",
           "world_size"]
