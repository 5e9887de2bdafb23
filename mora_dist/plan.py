"""Capacity planning before launch: ``mora-dist plan CONFIG [key=value ...] --world-size N [--gpu-memory GiB]``.

Per-GPU memory of a run's stream, per component, at every task (the bank grows by ``mora.r_task`` experts per
adapted layer and task, so the last task is the peak), for the configured ZeRO stage, offload and world size.
The shape comes from ``mora_dist.model_shapes`` (a preset or a local ``config.json``); nothing is loaded.

Components (bytes per GPU; ``e`` = bytes of ``model.dtype``, ``W`` = world size, ``T`` = trainable elements):

* ``base_parameters``: every frozen base tensor, ``e`` bytes per element; under ZeRO-3 each tensor is split over
  the workers (``ceil(n / W)``), and one with fewer than ``stage3_param_persistence_threshold`` (1e5) elements
  is also kept whole on every worker; 0 with ``offload_params``.
* ``adapter_bank``: per adapted layer the frozen experts ``A_frozen`` ((R - r) x d_in), ``B_frozen``
  (d_out x (R - r)) and the active block ``A`` (r x d_in), ``B`` (d_out x r), held like base tensors.
* ``adapter_gradients``, ``optimizer_states``: **only the active block** is trainable, so only ``T`` elements
  have gradients and AdamW states. DeepSpeed's estimators (``estimate_zero2_model_states_mem_needs`` and
  ``..._zero3_...``) assume every parameter trainable: 2 + 18 / W bytes per parameter under ZeRO-2/3 (16-bit
  weights, grads and fp32 master + moments for all of them); here the frozen base costs ``e`` (/ W under
  ZeRO-3) and only ``T`` costs gradients (``e``, / W at stage 2-3) and fp32 master + two moments (12 / W at
  stage >= 1; at stage 0 torch AdamW keeps its two moments in the parameter dtype, fp16 adds an fp32 master).
  One process trains with plain PyTorch AdamW (no DeepSpeed): grads ``e·T`` and moments ``2e·T``.
* ``activations`` (one micro-batch of ``train.micro_batch_size`` x ``model.max_length`` tokens, N tokens; the
  tensors autograd saves for backward in the Hugging Face Llama block with a frozen base, see
  ``activation_terms``), ``activations_no_checkpointing`` and ``activations_checkpointing``; ``activations``
  is the one of the configured ``train.gradient_checkpointing``.
* ``loss_head_transient``: the logits and their float32 copy while the loss is computed, ``N·V·(e + 4)``.
* ``eval_kv_cache``: generation's KV cache, ``eval.batch_size · (model.max_length + max_new_tokens) · layers ·
  2 · kv_dim · e``; ``eval_prefill_transient``: the MLP intermediates of the prefill (``3·I·e`` per token).
* ``deepspeed_buffers``: the gradient reduce bucket DeepSpeed allocates at stage 1-3 with contiguous gradients
  (``reduce_bucket_size`` = 5e8 elements of the model dtype, whatever the trainable size), and under ZeRO-3 the
  gathered working set (the largest module's parameters plus ``stage3_prefetch_bucket_size`` = 5e7 elements;
  DeepSpeed may hold up to ``stage3_max_live_parameters`` = 1e9 elements).

Not counted: the CUDA context and allocator fragmentation (keep 10-15 % free), communication library buffers,
the general suite's loglikelihood logits (lm-eval), temporary copies inside fused kernels.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from mora_dist.config import ConfigError, RunConfig
from mora_dist.model_shapes import ModelShape, resolve_shape
from mora_dist.mora.config import ATTENTION_TARGETS, MLP_TARGETS

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# DeepSpeed 0.19 defaults that size buffers (zero_optimization section; the run's ds_config leaves them unset).
DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
               "stage3_param_persistence_threshold": 100_000, "stage3_max_live_parameters": 1_000_000_000}
COMPONENTS = ("base_parameters", "adapter_bank", "adapter_gradients", "optimizer_states", "activations",
              "loss_head_transient", "deepspeed_buffers", "eval_kv_cache", "eval_prefill_transient")


@dataclass
class Setting:
    """What the estimate depends on, read from the run config."""

    world: int
    stage: int  # -1: one process, plain PyTorch
    e: int
    dtype: str
    offload_optimizer: bool
    offload_params: bool
    micro_batch: int
    seq: int
    r: int
    k: int
    dropout: float
    gated: bool
    router: bool
    grows: bool
    checkpointing: bool
    eval_batch: int
    max_new_tokens: int
    targets: tuple[str, ...]
    device: str = "cuda"  # "cpu": dropout masks take the input dtype (CPU validation runs)
    persistence: int = DS_DEFAULTS["stage3_param_persistence_threshold"]

    @property
    def zero3(self) -> bool:
        return self.stage == 3


def setting_of(cfg: RunConfig, world: int, seq_len: int | None = None, device: str = "cuda") -> Setting:
    """The planner's view of a run config at ``world`` workers."""
    from mora_dist.evaluation.generation import task_max_new_tokens

    if world < 1:
        raise ConfigError(f"--world-size {world}: must be >= 1")
    m = cfg.mora
    targets = tuple(m.target_modules) or (ATTENTION_TARGETS + (MLP_TARGETS if m.include_mlp else ()))
    new_tokens = [t.max_new_tokens or task_max_new_tokens(t.name) for t in cfg.tasks] or [task_max_new_tokens(None)]
    return Setting(world=world, stage=cfg.distributed.zero_stage if world > 1 else -1,
                   e=DTYPE_BYTES[cfg.model.dtype], dtype=cfg.model.dtype,
                   offload_optimizer=cfg.distributed.offload_optimizer and world > 1,
                   offload_params=cfg.distributed.offload_params and world > 1,
                   micro_batch=cfg.train.micro_batch_size, seq=int(seq_len or cfg.model.max_length), r=m.r_task,
                   k=m.k, dropout=float(m.dropout), gated=m.gate != "none", router=m.gate == "router",
                   grows=cfg.method != "seq_lora", checkpointing=bool(getattr(cfg.train, "gradient_checkpointing",
                                                                              False)),
                   eval_batch=cfg.eval.batch_size, max_new_tokens=max(new_tokens), targets=targets, device=device)


def _held(numel: int, s: Setting) -> int:
    """Elements of one parameter tensor held by each worker: its ZeRO-3 partition, plus the whole tensor for a
    persistent one (fewer elements than the threshold: DeepSpeed keeps it gathered besides its partition)."""
    if s.zero3:
        return math.ceil(numel / s.world) + (numel if numel < s.persistence else 0)
    return numel


def _adapted(shape: ModelShape, s: Setting) -> list[tuple[int, int]]:
    dims = shape.linear_dims()
    unknown = [t for t in s.targets if t not in dims]
    if unknown:
        raise ConfigError(f"mora.target_modules: {unknown} are not linear layers of a Llama-style block "
                          f"({', '.join(dims)}); the planner cannot size them")
    return [dims[t] for t in s.targets]


def activation_terms(shape: ModelShape, s: Setting, R: int, frozen: bool) -> dict[str, int]:
    """Bytes autograd saves for backward in one micro-batch (N = micro_batch x seq tokens), by part.

    Per decoder block with a frozen base (a frozen linear saves only its weight, never its input):

    * two RMSNorms: the float32 input and the inverse RMS, ``2 (4Nh + 4N)`` (the first block's input norm
      saves nothing: the frozen embedding's output needs no gradient);
    * attention (SDPA with a padding mask, so grouped KV heads are repeated): rotated queries, repeated keys
      and values, the output (which o_proj reads in place) and the float32 log-sum-exp, ``N (4 q_dim e +
      4 heads)``, plus the block's additive mask ``b s² e``;
    * MLP: gate output, its SiLU and the up output, ``3 N I e``;
    * each adapted layer: its input after dropout plus the dropout mask (1 byte on GPUs, ``e`` bytes on CPU; the
      first block's q/k/v keep no mask and no bank copy of the keys), one per layer; without dropout q/k/v share one input and gate/up
      another, and o_proj's input is the attention output already counted; the gate's scores and weights
      (float32), the top-k mask (1 byte, when k < R), the norm (float32 per token) and the coefficients fed to
      ``B`` (``N R (8 + e) + 4N (+ N R)``; ungated: ``N R e``); with frozen and active blocks the bank is
      concatenated per forward and the copies are saved too, ``R (d_in + d_out) e``.

    Under ZeRO-3 DeepSpeed's linear function saves the input of every linear layer, frozen or not: the
    blocks' q/k/v, gate/up and down inputs and the output head's input come on top.

    Outside the blocks: the final norm ``4Nh + 4N``, the float32 log-softmax of the loss ``4 N V`` and the labels
    ``8N``, RoPE's cos/sin ``2 s head_dim e``. With checkpointing each block keeps only its input, ``N h e``,
    and one block's saved tensors exist again while it is recomputed in backward. Checked against the saved
    tensors of real forwards (tests/test_plan.py, bench/plan_validation.py).
    """
    N, h, e, I = s.micro_batch * s.seq, shape.hidden, s.e, shape.intermediate
    mask_bytes = 1 if s.device == "cuda" else e
    norm = 4 * N * h + 4 * N
    attention = N * (4 * shape.q_dim * e + 4 * shape.heads) + s.micro_batch * s.seq * s.seq * e
    mlp = 3 * N * I * e
    dims = shape.linear_dims()
    inputs = gate = bank = first_masks = 0
    shared_inputs = set()
    for name in s.targets:
        d_in, d_out = dims[name]
        if s.dropout > 0:
            inputs += N * d_in * (e + mask_bytes)
            if name in ("q_proj", "k_proj", "v_proj"):
                first_masks += N * d_in * mask_bytes
        elif name != "o_proj":
            group = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp",
                     "up_proj": "mlp"}.get(name, name)
            if group not in shared_inputs:
                shared_inputs.add(group)
                inputs += N * d_in * e
        if s.gated:
            gate += N * R * (8 + e) + 4 * N + (N * R if s.k < R else 0)
        else:
            gate += N * R * e
        if frozen:
            bank += R * (d_in + d_out) * e
            if name in ("q_proj", "k_proj", "v_proj"):  # the first block's keys: only needed for dL/dx
                first_masks += R * d_in * e
    zero3_inputs = 0
    if s.zero3:  # DeepSpeed's ZeRO-3 linear (memory_efficient_linear) saves every input, frozen weight or not
        adapted_in = set() if s.dropout > 0 else set(s.targets)
        zero3_inputs += 0 if adapted_in & {"q_proj", "k_proj", "v_proj"} else N * h * e
        zero3_inputs += 0 if adapted_in & {"gate_proj", "up_proj"} else N * h * e
        zero3_inputs += 0 if "down_proj" in adapted_in else N * I * e  # o_proj reads the attention output
    per_block = 2 * norm + attention + mlp + inputs + gate + bank + zero3_inputs
    first_block = per_block - norm - first_masks
    head = norm + 4 * N * shape.vocab + 8 * N + (N * h * e if s.zero3 else 0)
    shared = 2 * s.seq * shape.head_dim * e
    layers = shape.layers
    return {"per_block": per_block, "head": head, "shared": shared,
            "no_checkpointing": (layers - 1) * per_block + first_block + head + shared,
            "checkpointing": layers * N * h * e + per_block + head + shared,
            "checkpointing_after_forward": layers * N * h * e + head + shared,
            "block_adapter_part": inputs + gate + bank}


def estimate_task(shape: ModelShape, s: Setting, task: int) -> dict:
    """Per-GPU bytes of each component while task ``task`` (0-based) trains and is evaluated."""
    e, W = s.e, s.world
    R = s.r * (task + 1) if s.grows else s.r
    frozen_r = R - s.r
    adapted = _adapted(shape, s) * shape.layers
    base = 0 if s.offload_params else sum(_held(n, s) for n in shape.tensors()) * e
    bank_tensors = []
    for d_in, d_out in adapted:
        bank_tensors += [s.r * d_in, s.r * d_out] + ([frozen_r * d_in, d_out * frozen_r] if frozen_r else [])
        if s.router:
            bank_tensors.append((task + 1) * d_in)
    bank = 0 if s.offload_params else sum(_held(n, s) for n in bank_tensors) * e
    trainable = sum(s.r * (d_in + d_out) + (d_in if s.router else 0) for d_in, d_out in adapted)
    part = math.ceil(trainable / W)
    cpu = 0
    if s.stage < 1:  # one process (torch AdamW) or DeepSpeed without ZeRO: moments in the parameter dtype
        grads = trainable * e
        # fp16 at stage 0: DeepSpeed's FP16 optimizer adds an fp32 master and float32 moments
        optim = 12 * trainable if (s.dtype == "float16" and s.stage == 0) else 2 * trainable * e
    else:
        grads = (trainable if s.stage == 1 else part) * e
        optim = 12 * part  # fp32 master partition + exp_avg + exp_avg_sq
        if s.offload_optimizer:
            cpu += optim + 4 * part
            grads, optim = (trainable * e if s.stage == 1 else 0), 0
    if s.offload_params:
        cpu += (sum(_held(n, s) for n in shape.tensors()) + sum(_held(n, s) for n in bank_tensors)) * e
    act = activation_terms(shape, s, R, frozen=frozen_r > 0 and s.r > 0)
    N = s.micro_batch * s.seq
    buffers = {}
    if s.stage >= 1:
        buffers["reduce_bucket"] = DS_DEFAULTS["reduce_bucket_size"] * e
    elif s.stage == 0:
        buffers["allreduce_flat_gradients"] = trainable * e
    if s.zero3:
        largest = max([shape.vocab * shape.hidden] + [a * b for a, b in shape.linear_dims().values()])
        buffers["zero3_gathered_parameters"] = min(largest + DS_DEFAULTS["stage3_prefetch_bucket_size"],
                                                   DS_DEFAULTS["stage3_max_live_parameters"]) * e
    comp = {
        "base_parameters": base, "adapter_bank": bank, "adapter_gradients": grads, "optimizer_states": optim,
        "activations": act["checkpointing"] if s.checkpointing else act["no_checkpointing"],
        "activations_no_checkpointing": act["no_checkpointing"], "activations_checkpointing": act["checkpointing"],
        "loss_head_transient": N * shape.vocab * (e + 4), "deepspeed_buffers": sum(buffers.values()),
        "eval_kv_cache": s.eval_batch * (s.seq + s.max_new_tokens) * shape.layers * 2 * shape.kv_dim * e,
        "eval_prefill_transient": s.eval_batch * s.seq * 3 * shape.intermediate * e,
    }
    comp["training_total"] = sum(comp[k] for k in ("base_parameters", "adapter_bank", "adapter_gradients",
                                                   "optimizer_states", "activations", "loss_head_transient",
                                                   "deepspeed_buffers"))
    comp["evaluation_total"] = (base + bank + comp["eval_kv_cache"] + comp["eval_prefill_transient"]
                                + buffers.get("zero3_gathered_parameters", 0))
    comp["peak_total"] = max(comp["training_total"], comp["evaluation_total"])
    return {"experts_per_layer": R, "trainable_parameters": trainable, "bytes": comp, "deepspeed_buffers": buffers,
            "activation_detail": act, "offloaded_to_cpu_bytes": cpu}


def deepspeed_all_trainable(shape: ModelShape, s: Setting) -> dict:
    """What DeepSpeed's own estimators give (every parameter trainable, 16-bit weights), for comparison."""
    P, W = shape.params, s.world
    largest = max([shape.vocab * shape.hidden] + [a * b for a, b in shape.linear_dims().values()])
    return {"zero2_gpu_bytes": 2 * P + int(18 * P / W),
            "zero3_gpu_bytes": 4 * largest + int(18 * P / W),
            "note": "DeepSpeed's estimate_zero{2,3}_model_states_mem_needs without offload: model states only, "
                    "all parameters trainable (no activations, no buffers)"}


def plan(cfg: RunConfig, world: int, gpu_memory_gib: float | None = None, seq_len: int | None = None,
         shape: ModelShape | None = None, recommend: bool = True, device: str = "cuda") -> dict:
    """The capacity plan of ``cfg`` at ``world`` workers: per-task and peak per-GPU bytes, per component.

    Returns:
        A JSON-able dict: ``model`` (shape), ``setting``, ``per_gpu_bytes`` / ``per_gpu_gib`` (at the peak task,
        one key per component plus ``training_total``, ``evaluation_total``, ``peak_total``), ``tasks`` (per
        task: experts per layer, training and evaluation totals), ``peak_task``, ``deepspeed_buffers``,
        ``offloaded_to_cpu_bytes``, ``deepspeed_all_trainable_estimate``, and with ``gpu_memory_gib`` ``fits``
        and ``recommendation``.
    """
    shape = shape or resolve_shape(cfg.model.name)
    s = setting_of(cfg, world, seq_len, device)
    warnings = []
    try:  # memory does not depend on accumulation, but the run would refuse a global batch that does not divide
        cfg.train.gradient_accumulation(world)
    except ConfigError as err:
        warnings.append(f"the run would refuse this world size: {err}")
    names = [t.name for t in cfg.tasks] or ["task0"]
    per_task = [estimate_task(shape, s, i) for i in range(len(names))]
    peak = max(range(len(names)), key=lambda i: (per_task[i]["bytes"]["peak_total"], i))
    top = per_task[peak]
    out = {
        "model": shape.as_dict(),
        "setting": {"world_size": world, "engine": "pytorch" if s.stage < 0 else f"deepspeed zero-{s.stage}",
                    "dtype": s.dtype, "offload_optimizer": s.offload_optimizer, "offload_params": s.offload_params,
                    "micro_batch_size": s.micro_batch, "seq_len": s.seq, "gradient_checkpointing": s.checkpointing,
                    "r_task": s.r, "k": s.k, "dropout": s.dropout, "targets": list(s.targets),
                    "eval_batch_size": s.eval_batch, "max_new_tokens": s.max_new_tokens, "tasks": len(names)},
        "per_gpu_bytes": top["bytes"],
        "per_gpu_gib": {k: round(v / GIB, 3) for k, v in top["bytes"].items()},
        "peak_task": names[peak],
        "tasks": [{"task": n, "experts_per_layer": t["experts_per_layer"],
                   "trainable_parameters": t["trainable_parameters"],
                   "training_gib": round(t["bytes"]["training_total"] / GIB, 3),
                   "evaluation_gib": round(t["bytes"]["evaluation_total"] / GIB, 3)} for n, t in zip(names, per_task)],
        "deepspeed_buffers": top["deepspeed_buffers"],
        "activation_detail": top["activation_detail"],
        "offloaded_to_cpu_bytes": top["offloaded_to_cpu_bytes"],
        "deepspeed_all_trainable_estimate": deepspeed_all_trainable(shape, s),
        "warnings": warnings,
    }
    if gpu_memory_gib is not None:
        budget = gpu_memory_gib * GIB
        out["gpu_memory_gib"] = gpu_memory_gib
        out["fits"] = top["bytes"]["peak_total"] <= budget
        if not out["fits"] and recommend:
            out["recommendation"] = recommendation(cfg, world, budget, seq_len, shape)
    return out


def _changes(cfg: RunConfig, world: int) -> list[tuple[str, callable]]:
    """Candidate changes, in the order they are worth trying (cheapest in speed first)."""
    t, d = cfg.train, cfg.distributed
    out = []
    if not getattr(t, "gradient_checkpointing", False):
        out.append(("train.gradient_checkpointing=true", lambda c: setattr(c.train, "gradient_checkpointing", True)))
    if world > 1 and d.zero_stage < 3:
        out.append(("distributed.zero_stage=3", lambda c: setattr(c.distributed, "zero_stage", 3)))
    if t.micro_batch_size > 1:
        def halve(c):
            if c.train.global_batch_size is None:
                c.train.global_batch_size = c.train.micro_batch_size * world
            c.train.micro_batch_size = max(1, c.train.micro_batch_size // 2)
        out.append((f"train.micro_batch_size={max(1, t.micro_batch_size // 2)} (keep train.global_batch_size)",
                    halve))
    if cfg.eval.batch_size > 1:
        out.append((f"eval.batch_size={max(1, cfg.eval.batch_size // 2)}",
                    lambda c: setattr(c.eval, "batch_size", max(1, c.eval.batch_size // 2))))
    if world > 1 and not d.offload_optimizer:
        out.append(("distributed.offload_optimizer=true", lambda c: setattr(c.distributed, "offload_optimizer", True)))
    if world > 1:
        out.append(("distributed.offload_params=true (with zero_stage=3)",
                    lambda c: (setattr(c.distributed, "zero_stage", 3), setattr(c.distributed, "offload_params", True))))
    return out


def recommendation(cfg: RunConfig, world: int, budget: float, seq_len: int | None, shape: ModelShape) -> list[str]:
    """Short advice when the peak does not fit ``budget`` bytes: single changes that make it fit, else a
    cumulative set, else the world size ZeRO-3 needs."""
    def peak_of(c, w):
        try:
            return plan(c, w, seq_len=seq_len, shape=shape, recommend=False)["per_gpu_bytes"]["peak_total"]
        except ConfigError:
            return math.inf

    advice, cumulative, applied = [], copy.deepcopy(cfg), []
    for label, change in _changes(cfg, world):
        single = copy.deepcopy(cfg)
        change(single)
        peak = peak_of(single, world)
        if peak <= budget:
            advice.append(f"fits with {label}: {peak / GIB:.1f} GiB per GPU")
    if not advice:  # apply the changes one after the other until it fits
        for label, change in _changes(cfg, world):
            change(cumulative)
            applied.append(label)
            peak = peak_of(cumulative, world)
            if peak <= budget:
                advice.append(f"fits with {', '.join(applied)}: {peak / GIB:.1f} GiB per GPU")
                break
    if not advice:
        z3 = copy.deepcopy(cfg)
        z3.distributed.zero_stage = 3
        z3.train.gradient_checkpointing = True
        for w in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            if w > world and peak_of(z3, w) <= budget:
                advice.append(f"fits on {w} GPUs with ZeRO-3 and gradient checkpointing: "
                              f"{peak_of(z3, w) / GIB:.1f} GiB per GPU")
                break
        else:
            advice.append("does not fit with any of the settings tried; use GPUs with more memory")
    return advice


def format_plan(p: dict) -> str:
    """The plan as a short readable table."""
    st = p["setting"]
    lines = [f"model {p['model']['name']} ({p['model']['params'] / 1e9:.2f}B parameters), {st['engine']}, "
             f"{st['world_size']} GPU(s), {st['dtype']}, micro-batch {st['micro_batch_size']} x {st['seq_len']} "
             f"tokens, gradient checkpointing {'on' if st['gradient_checkpointing'] else 'off'}",
             f"peak task: {p['peak_task']} ({p['tasks'][-1]['experts_per_layer']} experts per adapted layer at the "
             "last task)", "", "per GPU at the peak task:"]
    for key in COMPONENTS + ("activations_no_checkpointing", "activations_checkpointing"):
        lines.append(f"  {key:<30} {p['per_gpu_gib'][key]:>10.3f} GiB")
    for key in ("training_total", "evaluation_total", "peak_total"):
        lines.append(f"  {key:<30} {p['per_gpu_gib'][key]:>10.3f} GiB")
    if p["offloaded_to_cpu_bytes"]:
        lines.append(f"  offloaded to CPU (per GPU)     {p['offloaded_to_cpu_bytes'] / GIB:>10.3f} GiB")
    ds = p["deepspeed_all_trainable_estimate"]
    lines.append(f"  (DeepSpeed's all-trainable estimate of model states: ZeRO-2 {ds['zero2_gpu_bytes'] / GIB:.2f} "
                 f"GiB, ZeRO-3 {ds['zero3_gpu_bytes'] / GIB:.2f} GiB)")
    lines += [f"warning: {w}" for w in p.get("warnings", [])]
    if "fits" in p:
        lines.append("")
        lines.append(f"fits in {p['gpu_memory_gib']} GiB: {'yes' if p['fits'] else 'no'}")
        lines += [f"  - {r}" for r in p.get("recommendation", [])]
    return "\n".join(lines) + "\n"
