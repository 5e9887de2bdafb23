"""MoRA under DeepSpeed ZeRO 0-3: the only module of the package that imports ``deepspeed``.

Once per run, on every rank::

    rank, world, local_rank = init_distributed()           # mora_dist.distributed.env
    model = build_model(lambda: AutoModelForCausalLM.from_pretrained(path), run_cfg)  # zero.Init under ZeRO-3
    inject_mora(model, run_cfg.mora)                       # or bank.load_adapter(model, dir) to resume

One task, in order (every call on every rank; B = mora_dist.distributed.bank, S = mora_dist.distributed.stats)::

    B.grow(model, task_name, seed=...)                     # new trainable block (ZeRO-3: on gathered tensors)
    engine = build_engine(model, run_cfg, total_steps=n)   # fresh AdamW over the active block only
    losses = trainer.train_task(engine, my_micro_batches)  # the one training step, per optimizer step
    stats = S.collect_statistics(engine, my_stat_batches, min_keep=run_cfg.prune.min_keep)  # ONE all-reduce
    decision = decide_pruning(stats, model, run_cfg.prune)  # mora_dist.mora.pruning
    S.check_decision_agrees(decision)                      # hash compared across ranks
    atomic_write_json(stats_path, S.statistics_record(stats, decision, task_name))  # rank 0: stats/NN-TASK.json
    destroy_engine(engine)
    B.prune(model, decision); B.freeze(model)              # ZeRO-3 aware
    B.save_adapter(model, run_dir / "adapter")             # gathered on all ranks, rank 0 writes atomically
    ev = build_inference_engine(model, run_cfg)            # evaluation forwards (ZeRO-3 needs the hooks) ...
    destroy_engine(ev)                                     # ... and gone before the next grow

The trainable set changes at every task boundary, so each task gets a fresh engine and optimizer (docs/design.md,
Distribution). The ds_config an engine was built with is ``engine.mora_ds_config`` (write it into the run
directory).

Mid-task checkpoints (``mora_dist.run.portable``) hold the active block's optimizer state whole: ``gather_state``
assembles AdamW's moments (and the fp32 master weights when the model is in 16 bits) of every trainable
parameter from the ZeRO partitions (a collective), ``restore_state`` writes such full tensors into the
partitions of a freshly built engine of any world size, with AdamW's step count and the schedule's position.
ZeRO 1-3 and the bf16 optimizer go through DeepSpeed's tensor-fragment API (``deepspeed.utils``); without ZeRO
in fp32 the optimizer holds the parameters themselves.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)
from torch import nn

from mora_dist.config import RunConfig
from mora_dist.distributed.ds_config import ds_config
from mora_dist.distributed.env import ensure_process_group, world_size
from mora_dist.mora import is_adapter_parameter, trainable_parameters
from mora_dist.run.portable import MOMENTS
from mora_dist.schedule import lr_factor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_DS_CONFIG = None  # transformers only holds a weak reference; keep ZeRO-3 visible to it (from_pretrained, generate)


def _init_comm(backend: str | None) -> None:
    """A process group (ours, never DeepSpeed's MPI discovery) and DeepSpeed's communication layer over it."""
    ensure_process_group(backend)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


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
    cfg = ds_config(run_cfg.train, run_cfg.distributed, run_cfg.model.dtype, world_size(),
                    persistence_threshold=persistence_threshold)
    _HF_DS_CONFIG = HfDeepSpeedConfig(cfg)
    _import_lazy_modules()
    # dtype comes from the ds_config (bf16/fp16 sections): DeepSpeed 0.19 ignores an explicit float32 dtype on
    # machines without fp16 support and builds bfloat16 parameters and buffers.
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = loader()
    return model


@contextlib.contextmanager
def gathered_parameters(params: list[torch.Tensor]):
    """DeepSpeed's gathering of ZeRO-3 parameters (read only); use ``bank.gathered``, which skips it off ZeRO-3."""
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


# -------------------------------------------------------------------------------------------------- engines
def build_engine(model: nn.Module, run_cfg: RunConfig, *, total_steps: int, lr: float | None = None,
                 persistence_threshold: int | None = None):
    """A DeepSpeed engine that trains only the active MoRA block of ``model`` for one task.

    AdamW (torch's, or DeepSpeed's CPU Adam with ``offload_optimizer``) over the active block; learning rate
    ``lr * lr_factor(step)`` with the run's schedule (cosine to 0 over ``total_steps``, or constant) and warm-up,
    the same schedule as the one-process loop (``mora_dist.schedule``).

    Raises:
        ConfigError: see ``ds_config``. ValueError: no active block (call ``bank.grow`` first).
    """
    _init_comm(run_cfg.distributed.backend)
    train = run_cfg.train
    lr = float(lr if lr is not None else train.lr)
    cfg = ds_config(train, run_cfg.distributed, run_cfg.model.dtype, world_size(), lr=lr,
                    persistence_threshold=persistence_threshold)
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("nothing to train: the model has no active MoRA block; call bank.grow(model, name) first")
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
    cfg = ds_config(run_cfg.train, run_cfg.distributed, run_cfg.model.dtype, world_size(),
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



# ---------------------------------------------------------------------------------- optimizer state
def _shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_id") else p.shape


def _fragmented(p: torch.Tensor) -> bool:
    """True where ZeRO (or the bf16 optimizer) holds this parameter's optimizer state in partitions."""
    # under ZeRO 1/2 a parameter outside this worker's partition has ``_hp_mapping = None``: it still takes part
    # in the gathering collectives (with zeros)
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _opt_step(engine) -> int:
    for st in engine.basic_optimizer.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def gather_state(engine, named_params: list[tuple[str, torch.Tensor]], model_dtype: torch.dtype):
    """``(opt_step, moments, masters)`` of the engine's trainable parameters, whole, on every worker.

    ``moments[name]`` is empty before the first optimizer step. ``masters`` is empty for fp32 models (the
    adapter itself is the master copy then).
    """
    opt_step = _opt_step(engine)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    masters: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        if not opt_step:
            moments[name] = {}
            continue
        if _fragmented(p):
            moments[name] = {k: safe_get_full_optimizer_state(p, k).detach().reshape(_shape(p)).cpu().clone()
                             for k in MOMENTS}
            if model_dtype != torch.float32:
                masters[name] = safe_get_full_fp32_param(p).detach().reshape(_shape(p)).cpu().clone()
        else:
            st = engine.basic_optimizer.state[p]
            moments[name] = {k: st[k].detach().cpu().clone() for k in MOMENTS}
    return opt_step, moments, masters


def _flat_partitions(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer steps on: this worker's flat fp32 partitions under ZeRO 3, 1/2 and the
    bf16 optimizer (swapped into its param groups only during a step), else the parameters themselves."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(engine.optimizer, attr, None)
        if flats is not None:
            return list(flats)
    return [p for group in engine.basic_optimizer.param_groups for p in group["params"]]


def _new_state(optimizer, flat: torch.Tensor, opt_step: int) -> dict:
    # torch's Adam/AdamW keep the step as a float tensor; DeepSpeed's CPU Adam as an int
    step = torch.tensor(float(opt_step)) if isinstance(optimizer, torch.optim.Optimizer) and \
        type(optimizer).__module__.startswith("torch.") else opt_step
    return {"step": step, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}


def restore_state(engine, named_params: list[tuple[str, torch.Tensor]], state, step: int) -> None:
    """Put a ``portable.PortableState`` into a freshly built engine (no optimizer step taken yet).

    Args:
        engine: from ``engine.build_engine`` for the task being resumed, on any world size.
        named_params: the trainable parameters, by the names the state was saved under.
        state: from ``portable.read_state``.
        step: optimizer steps done; the learning-rate schedule continues from there.
    """
    base = engine.basic_optimizer
    if state.opt_step:
        for flat in _flat_partitions(engine):  # AdamW creates its state at the first step: create it now
            if not base.state.get(flat):
                base.state[flat] = _new_state(base, flat, state.opt_step)
        link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO 1/2 and bf16: point each parameter's fragment at the new state
            link()
        for name, p in named_params:
            for key in MOMENTS:
                value = state.moments[name][key].to(p.device)
                if _fragmented(p):
                    safe_set_full_optimizer_state(p, value, key)
                else:
                    base.state[p][key].copy_(value.reshape(p.shape))
    for name, p in named_params:
        if name in state.masters and _fragmented(p):
            safe_set_full_fp32_param(p, state.masters[name].to(p.device))
    sched = engine.lr_scheduler
    if sched is not None and step:
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            sched.last_epoch = step - 1
            sched.step()
    gas = engine.gradient_accumulation_steps()
    engine.global_steps, engine.micro_steps = step, step * gas
    engine.global_samples = step * engine.train_batch_size()
