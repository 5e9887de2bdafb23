"""The DeepSpeed config, derived in code from the typed run config (no JSON templates, no deepspeed import)."""

from __future__ import annotations

import torch

from mora_dist.config import ConfigError, DistributedConfig, TrainConfig


def ds_config(train_cfg: TrainConfig, dist_cfg: DistributedConfig, model_dtype: str, world_size: int, *,
              lr: float | None = None, persistence_threshold: int | None = None) -> dict:
    """The DeepSpeed config, derived in code from the typed run config (no JSON templates).

    Args:
        train_cfg, dist_cfg: ``run.train`` and ``run.distributed``.
        model_dtype: ``run.model.dtype`` (float32, bfloat16 or float16).
        world_size: data-parallel workers.
        lr: learning rate of the DeepSpeed-built optimizer (only used with ``offload_optimizer``).
        persistence_threshold: ZeRO-3 parameters with fewer elements stay whole on every worker (DeepSpeed's
            default is 1e5; 0 partitions everything).

    The stage, the offload of parameters and the dtype were checked when the config was loaded.

    Raises:
        ConfigError: offload of the optimizer without ZeRO, a 16-bit model without ZeRO, or a global batch that
            does not divide (from ``TrainConfig.gradient_accumulation``).
    """
    stage = dist_cfg.zero_stage
    if dist_cfg.offload_optimizer and stage == 0:  # the combinations the typed config cannot check alone
        raise ConfigError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
    if stage == 0 and model_dtype != "float32":
        # DeepSpeed then wraps the optimizer in its 16-bit optimizer, whose fp32 copies and moments a mid-task
        # checkpoint cannot reach; ZeRO-1 keeps the same model replicas and shards only the optimizer states
        raise ConfigError(f"distributed.zero_stage=0 with model.dtype={model_dtype} on {world_size} workers: "
                          "16-bit training under DeepSpeed needs ZeRO; set distributed.zero_stage=1 (the same "
                          "memory for the model, less for the optimizer) or model.dtype=float32")
    gas = train_cfg.gradient_accumulation(world_size)
    micro = train_cfg.micro_batch_size
    pin = torch.cuda.is_available()
    zero: dict = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if dist_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if dist_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if stage == 3 and persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = int(persistence_threshold)
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "gradient_clipping": float(train_cfg.grad_clip or 0.0),
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if model_dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif model_dtype == "float16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if dist_cfg.offload_optimizer:  # DeepSpeed then builds its CPU Adam for the offloaded states
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": float(lr if lr is not None else train_cfg.lr),
                                                        "weight_decay": float(train_cfg.weight_decay),
                                                        "betas": [0.9, 0.999], "eps": 1e-8}}
    return cfg
