"""The one typed run configuration: nested dataclasses (``schema.py``), loaded from YAML with ``key.sub=value``
overrides (``loading.py``).

Every field is checked when the config is built; unknown keys are fatal with a suggestion; cross-field rules
(batch arithmetic, task names) are checked at load. ``mora-dist validate CONFIG`` prints the resolved config.
"""

from mora_dist.config.loading import RETIRED_KEYS, apply_overrides, dump_config, expand_vars, load_config
from mora_dist.config.schema import (
    DataConfig, DistributedConfig, EvalConfig, ModelConfig, PruneConfig, RunConfig, TaskConfig, TrainConfig,
)
from mora_dist.errors import ConfigError
from mora_dist.methods import METHODS, MoELoRAConfig, OLoRAConfig

__all__ = [
    "METHODS", "RETIRED_KEYS", "ConfigError", "DataConfig", "DistributedConfig", "EvalConfig", "ModelConfig",
    "MoELoRAConfig", "OLoRAConfig", "PruneConfig", "RunConfig", "TaskConfig", "TrainConfig", "apply_overrides",
    "dump_config", "expand_vars", "load_config",
]
