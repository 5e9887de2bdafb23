"""Data-parallel MoRA: launcher discovery and world size (``env``), the few collectives (``collectives``), the
DeepSpeed engine (``engine``, the only importer of deepspeed) and trainer (``trainer``), bank changes that work
the same off and under ZeRO-3 (``bank``), all-reduced routing statistics and pruning (``stats``), and launch
command generation (``launch_cmd``)."""

from mora_dist.distributed.env import (
    DistributedEnvError, barrier, init_distributed, is_main, print0, rank, shutdown, world_size,
)

__all__ = ["DistributedEnvError", "barrier", "init_distributed", "is_main", "print0", "rank", "shutdown",
           "world_size"]
