"""MoRA under DeepSpeed ZeRO 0-3: with ``engine_state.py`` the only modules of the package that import ``deepspeed``.

Once per run, on every rank::

    rank, world, local_rank = init_distributed()           # mora_dist.distributed.env
    model = build_model(lambda: AutoModelForCausalLM.from_pretrained(path), run_cfg)  # zero.Init under ZeRO-3
    inject_mora(model, run_cfg.mora)                       # or load_adapter_distributed(model, dir) to resume

One task, in order (every call on every rank; S = mora_dist.distributed.stats)::

    grow(model, task_name, seed=...)                       # new trainable block (ZeRO-3: on gathered tensors)
    engine = build_engine(model, run_cfg, total_steps=n)   # fresh AdamW over the active block only
    losses = train_task(engine, my_micro_batches)          # per-step losses, averaged over ranks
    stats = S.collect_statistics(engine, my_stat_batches, min_keep=run_cfg.prune.min_keep)  # eval forwards,
                                                           # removal ladder, ONE all-reduce
    decision = decide_pruning(stats, model, run_cfg.prune)  # mora_dist.mora.pruning
    S.check_decision_agrees(decision)                      # hash compared across ranks
    atomic_write_json(stats_path, S.statistics_record(stats, decision, task_name))  # rank 0: stats/NN-TASK.json
    destroy_engine(engine)
    prune(model, decision); freeze(model)                  # ZeRO-3 aware
    save_adapter_distributed(model, run_dir / "adapter")   # gathered on all ranks, rank 0 writes atomically
    ev = build_inference_engine(model, run_cfg)            # evaluation forwards (ZeRO-3 needs the hooks) ...
    destroy_engine(ev)                                     # ... and gone before the next grow

The trainable set changes at every task boundary, so each task gets a fresh engine and optimizer (docs/design.md,
Distribution).
Under ZeRO-3 the bank is changed on full tensors gathered on every rank; the new parameters are plain tensors
until the next ``deepspeed.initialize`` partitions them (rank 0's values are broadcast then). The ds_config an
engine was built with is ``engine.mora_ds_config`` (write it into the run directory).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterable

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from mora_dist.config import ConfigError, DistributedConfig, RunConfig, TrainConfig
from mora_dist.distributed.env import barrier, ensure_process_group, is_main
from mora_dist.mora import add_block, adapter_state_dict, freeze_blocks, is_adapter_parameter, trainable_parameters
from mora_dist.mora.adapter import describe_adapter, load_adapter, write_adapter
from mora_dist.training import lr_factor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_DS_CONFIG = None  # transformers only holds a weak reference; keep ZeRO-3 visible to it (from_pretrained, generate)


# ------------------------------------------------------------------------------------------------ ds_config
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

    Raises:
        ConfigError: a stage outside 0-3, offload without the stage it needs, or a global batch that does not
            divide (from ``TrainConfig.gradient_accumulation``).
    """
    stage = dist_cfg.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage={stage!r}: must be 0, 1, 2 or 3")
    if dist_cfg.offload_params and stage != 3:
        raise ConfigError("distributed.offload_params needs distributed.zero_stage=3")
    if dist_cfg.offload_optimizer and stage == 0:
        raise ConfigError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
    if model_dtype not in DTYPES:
        raise ConfigError(f"model.dtype={model_dtype!r}: choose float32, bfloat16 or float16")
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: must be >= 1")
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


def _init_comm(backend: str | None) -> None:
    """A process group (ours, never DeepSpeed's MPI discovery) and DeepSpeed's communication layer over it."""
    ensure_process_group(backend)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _import_lazy_modules() -> None:
    """Import, outside ``zero.Init``, what transformers would otherwise import lazily inside it.

    ``deepspeed.zero.Init`` patches ``torch.Tensor.__new__`` while it is active. transformers (5.x) imports
    ``torch._dynamo`` lazily from its generation and masking code, and dynamo's polyfills check the signature of
    ``torch.Tensor.__new__`` when they are first imported: done under the patch, that check raises
    "Signature mismatch between get_new_tensor_fn_for_dtype.<locals>.new_tensor and tensor_pynew" and every
    ZeRO-3 start-up dies. Imported once here, before the patch, they stay valid after it.
    """
    import torch._dynamo  # noqa: F401  (registers the polyfills against the unpatched Tensor.__new__)
    import transformers.generation.utils  # noqa: F401  (its lazy imports, e.g. masking_utils, happen now)


def build_model(loader: Callable[[], nn.Module], run_cfg: RunConfig, *,
                persistence_threshold: int | None = None) -> nn.Module:
    """Build the base model; under ZeRO-3 inside ``deepspeed.zero.Init`` so no worker ever holds it whole.

    Args:
        loader: builds the model, e.g. ``lambda: AutoModelForCausalLM.from_pretrained(path)``. Under ZeRO-3
            transformers' ``from_pretrained`` loads the weights straight into the partitions.
        run_cfg: the run config (stage, dtype, batch arithmetic for the ds_config).
    """
    global _HF_DS_CONFIG
    if run_cfg.distributed.zero_stage != 3:
        return loader()
    from transformers.integrations import HfDeepSpeedConfig

    _init_comm(run_cfg.distributed.backend)
    cfg = ds_config(run_cfg.train, run_cfg.distributed, run_cfg.model.dtype, _world(),
                    persistence_threshold=persistence_threshold)
    _HF_DS_CONFIG = HfDeepSpeedConfig(cfg)
    _import_lazy_modules()
    # dtype comes from the ds_config (bf16/fp16 sections): DeepSpeed 0.19 ignores an explicit float32 dtype on
    # machines without fp16 support and builds bfloat16 parameters and buffers.
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = loader()
    return model


# ----------------------------------------------------------------------------------------- ZeRO-3 gathering
def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (its data lives in partitions across workers)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]):
    """Full tensors of ``params`` on every worker inside the block (read only); a no-op off ZeRO-3."""
    zero_params = [p for p in params if is_partitioned(p)]
    if not zero_params:
        yield
        return
    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=None):
        yield


def adapter_parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if is_adapter_parameter(n)]


def gathered_state(model: nn.Module, predicate: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Copies of the full parameters whose names satisfy ``predicate``, on every worker (snapshots, checks)."""
    named = [(n, p) for n, p in model.named_parameters() if predicate(n)]
    with gathered(p for _, p in named):
        return {n: p.detach().clone() for n, p in named}


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole bank of every MoRA layer (``<layer>.A``, ``<layer>.B``) as full tensors on every worker.

    A collective under ZeRO-3: every worker must call it.
    """
    with gathered(adapter_parameters(model)):
        return {k: v.clone() for k, v in adapter_state_dict(model).items()}


@contextlib.contextmanager
def bank_gathered(model: nn.Module):
    """Gather every MoRA parameter so the bank can be changed with the plain MoRA methods.

    The replaced parameters become plain (whole) tensors; the next ``build_engine`` partitions them again.
    """
    with gathered(adapter_parameters(model)):
        yield


def grow(model: nn.Module, name: str, config=None, seed: int | None = None) -> None:
    """Start a task: freeze the active block and append a new trainable block (ZeRO-3 aware).

    Args:
        seed: seeds the new keys' initialisation without touching the global RNG (same on every worker and in a
            one-process run); ``None`` uses the global RNG (workers then get rank 0's values at engine build).
    """
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with bank_gathered(model), rng:
        if seed is not None:
            torch.manual_seed(seed)
        add_block(model, name, config)


def unfreeze_last(model: nn.Module) -> None:
    """Start a task on the last block again instead of a new one (seq_lora; ZeRO-3 aware)."""
    from mora_dist.mora.inject import unfreeze_last_block

    with bank_gathered(model):
        unfreeze_last_block(model)


def freeze(model: nn.Module) -> None:
    """End a task: move the active block into the frozen bank (ZeRO-3 aware)."""
    with bank_gathered(model):
        freeze_blocks(model)


def prune(model: nn.Module, decision: dict) -> None:
    """Remove the experts named by a pruning decision (``mora.pruning.decide_pruning``) from the bank (ZeRO-3 aware)."""
    from mora_dist.mora.pruning import apply_pruning

    with bank_gathered(model):
        apply_pruning(model, decision)


# -------------------------------------------------------------------------------------------------- engines
def build_engine(model: nn.Module, run_cfg: RunConfig, *, total_steps: int, lr: float | None = None,
                 persistence_threshold: int | None = None):
    """A DeepSpeed engine that trains only the active MoRA block of ``model`` for one task.

    AdamW (torch's, or DeepSpeed's CPU Adam with ``offload_optimizer``) over the active block; learning rate
    ``lr * lr_factor(step)`` with the run's schedule (cosine to 0 over ``total_steps``, or constant) and warm-up,
    the same schedule as the one-process loop in ``mora_dist.training``.

    Raises:
        ConfigError: see ``ds_config``. ValueError: no active block (call ``grow`` first).
    """
    _init_comm(run_cfg.distributed.backend)
    train = run_cfg.train
    lr = float(lr if lr is not None else train.lr)
    cfg = ds_config(train, run_cfg.distributed, run_cfg.model.dtype, _world(), lr=lr,
                    persistence_threshold=persistence_threshold)
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("nothing to train: the model has no active MoRA block; call grow(model, name) first")
    stray = [n for n, p in model.named_parameters() if p.requires_grad and not is_adapter_parameter(n)]
    if stray:
        raise ValueError(f"base parameters require grad (they must stay frozen): {stray[:3]}")

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total_steps, train.schedule, train.warmup_steps))

    kwargs = dict(model=model, config=cfg, lr_scheduler=scheduler)
    if "optimizer" in cfg:
        kwargs["model_parameters"] = params
    else:
        kwargs["optimizer"] = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(**kwargs)
    engine.mora_ds_config = cfg
    return engine


def build_inference_engine(model: nn.Module, run_cfg: RunConfig, *, persistence_threshold: int | None = None):
    """A DeepSpeed engine without optimizer, for forwards (statistics, evaluation) on a frozen bank.

    Under ZeRO-3 it installs the parameter-gathering hooks a forward needs; all workers must run the same
    number of forwards (use ``synced_gpus=True`` in generation).
    """
    _init_comm(run_cfg.distributed.backend)
    cfg = ds_config(run_cfg.train, run_cfg.distributed, run_cfg.model.dtype, _world(),
                    persistence_threshold=persistence_threshold)
    cfg.pop("optimizer", None)
    cfg["zero_optimization"].pop("offload_optimizer", None)
    if cfg["zero_optimization"]["stage"] < 3:  # parameters are whole on every worker: nothing to partition
        cfg["zero_optimization"] = {"stage": 0}
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine


def destroy_engine(engine) -> nn.Module:
    """Tear an engine down (hooks, optimizer, gradients) at a task boundary; returns the bare model."""
    model = engine.module
    engine.destroy()
    # ZeRO-3 caches its backward hooks on each module as closures over *this* engine ("pre_bwd_fn",
    # "post_bwd_fn") and reuses them in the next engine, whose parameter trace they then corrupt
    # ("tracing error ... expected the next N parameters"). Drop them with the engine.
    for module in model.modules():
        for attr in ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt"):
            module.__dict__.pop(attr, None)
    for p in model.parameters():
        p.grad = None
    del engine
    import gc

    gc.collect()
    return model


def train_task(engine, batches: Iterable[dict], *,
               on_step: Callable[[int, float, int, float], None] | None = None) -> list[float]:
    """Train one task: this worker's micro-batches in order; returns the loss of every optimizer step.

    Args:
        engine: from ``build_engine``.
        batches: dicts with ``input_ids``, ``attention_mask``, ``labels``; a multiple of the engine's gradient
            accumulation steps, and the same number on every worker (ZeRO-3 deadlocks otherwise).
        on_step: ``on_step(step, loss, tokens, seconds)`` after each optimizer step (rank 0 logs).

    Returns:
        Per optimizer step, the mean micro-batch loss over accumulation steps and workers (same on every worker).
    """
    gas = engine.gradient_accumulation_steps()
    if hasattr(batches, "__len__") and len(batches) % gas:
        raise ValueError(f"{len(batches)} micro-batches is not a multiple of gradient_accumulation_steps={gas}")
    world = _world()
    engine.train()
    losses: list[float] = []
    acc, micro, tokens, t0 = None, 0, 0, time.perf_counter()
    for batch in batches:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        acc = loss.detach().double() if acc is None else acc + loss.detach().double()
        micro += 1
        tokens += int(batch["attention_mask"].sum())
        if boundary:
            mean = (acc / micro).reshape(1)
            if world > 1:
                dist.all_reduce(mean)
                mean /= world
            losses.append(float(mean))
            if on_step is not None:
                on_step(len(losses) - 1, losses[-1], tokens, time.perf_counter() - t0)
            acc, micro, tokens, t0 = None, 0, 0, time.perf_counter()
    if micro:
        raise ValueError(f"{micro} micro-batches left after the last optimizer step: give a multiple of "
                         f"gradient_accumulation_steps={gas}")
    engine.eval()
    return losses


# ------------------------------------------------------------------------------------------------- adapters
def save_adapter_distributed(model: nn.Module, directory: str | Path) -> Path:
    """Save the adapter from any stage: gathered on every worker, written atomically by rank 0 only.

    A collective: every worker must call it. Returns the folder (written when this returns on any rank).
    """
    state = gathered_adapter_state(model)
    description = describe_adapter(model)
    if any(not v.numel() for v in state.values()) and any(sum(l["block_sizes"]) for l in
                                                          description["layers"].values()):
        raise RuntimeError("gathered adapter has empty tensors; was it gathered under ZeRO-3?")
    if is_main():
        write_adapter(state, description, directory)
    barrier()
    return Path(directory)


def load_adapter_distributed(model: nn.Module, directory: str | Path, trainable_last: bool | None = None):
    """Load an adapter saved at any world size onto ``model`` at this one (every worker reads the folder).

    Under ZeRO-3 the loaded bank is held whole until the next ``build_engine`` partitions it.
    """
    with bank_gathered(model):
        return load_adapter(model, directory, trainable_last=trainable_last)
