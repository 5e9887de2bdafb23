"""A DeepSpeed engine's optimizer state for the active block, gathered whole and put back on any world size.

Beside ``engine.py`` this is the only module that imports ``deepspeed``. It serves the world-size independent
mid-task checkpoints of ``mora_dist.run.portable``: ``gather_state`` assembles AdamW's moments (and the fp32
master weights when the model is in 16 bits) of every trainable parameter from the ZeRO partitions (a
collective: every worker calls it), ``restore_state`` writes such full tensors into the partitions of a freshly
built engine of any world size, together with AdamW's step count and the learning-rate schedule's position.
ZeRO 1-3 and the bf16 optimizer go through DeepSpeed's tensor-fragment API (``deepspeed.utils``); without ZeRO
in fp32 the optimizer holds the parameters themselves.
"""

from __future__ import annotations

import warnings

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)

from mora_dist.run.portable import MOMENTS


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
