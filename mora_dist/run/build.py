"""What a run is built from: the tokenizer, the model with its MoRA layers inside the right trainer, and each
task's encoded training examples. The orchestrator asks for them; it does not build them itself."""

from __future__ import annotations

from pathlib import Path

from mora_dist.config import ConfigError
from mora_dist.training import Trainer


def load_run_tokenizer(cfg):
    """The tokenizer of ``cfg.model``."""
    from mora_dist.base_model import load_tokenizer

    return load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)


def build_trainer(cfg, world_size: int, run_dir: Path) -> Trainer:
    """The base model with MoRA injected, inside its trainer: ``LocalTrainer`` in one process, else
    ``DeepSpeedTrainer`` (under ZeRO-3 the base is built inside ``zero.Init``: no worker ever holds it whole;
    the ds_config goes to ``run_dir/ds_config.json``). Otherwise the model is put on this worker's GPU when there
    is one (``device.compute_device``) before the MoRA layers are injected, so they are built there too.

    Raises:
        TypeError: a trainer that does not implement ``training.Trainer``.
    """
    from mora_dist.base_model import load_model
    from mora_dist.device import compute_device
    from mora_dist.mora import inject_mora

    m = cfg.model

    def loader():
        return load_model(m.name, dtype=m.dtype, trust_remote_code=m.trust_remote_code)

    if world_size > 1:
        from mora_dist.distributed import engine
        from mora_dist.distributed.trainer import DeepSpeedTrainer

        model = engine.build_model(loader, cfg)
        if cfg.distributed.zero_stage != 3:  # ZeRO-3's partitions are placed by zero.Init
            model.to(compute_device())
        inject_mora(model, cfg.mora)
        trainer = DeepSpeedTrainer(model, cfg, Path(run_dir) / "ds_config.json")
    else:
        from mora_dist.run.trainer import LocalTrainer

        model = loader().to(compute_device())
        inject_mora(model, cfg.mora)
        trainer = LocalTrainer(model, cfg)
    if not isinstance(trainer, Trainer):
        raise TypeError(f"{type(trainer).__name__} does not implement mora_dist.training.Trainer")
    if cfg.train.gradient_checkpointing:
        from mora_dist.activation_checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    return trainer


def encode_train_examples(cfg, index: int, tok):
    """``(encoded examples, report)`` of task ``index``'s training split (``data.tokenize.encode_examples``).

    Raises:
        ConfigError: every example is longer than ``model.max_length``.
    """
    from mora_dist.data import encode_examples, load_task_examples

    task = cfg.tasks[index]
    examples = load_task_examples(task, cfg.data.root, "train", limit=cfg.train.max_examples, seed=cfg.train.seed)
    encoded, report = encode_examples(tok, examples, cfg.model.max_length, cfg.model.chat_template,
                                      cfg.model.system_prompt)
    if not encoded:
        raise ConfigError(f"task {task.name!r}: every training example is longer than model.max_length="
                          f"{cfg.model.max_length}; raise it")
    return encoded, report


def check_data(cfg) -> tuple[object, Exception | None]:
    """Read and check every split the stream will use before any stage runs (fail fast).

    Returns:
        ``(tokenizer or None, the error or None)``: the tokenizer the check loaded, to be reused.
    """
    from mora_dist.data import DataError
    from mora_dist.data.check import check_stream_data
    from mora_dist.base_model import ModelSourceError

    loaded = []

    def loader():
        loaded.append(load_run_tokenizer(cfg))
        return loaded[-1]

    try:
        check_stream_data(cfg, loader)
    except (DataError, ModelSourceError) as err:
        return (loaded[-1] if loaded else None), err
    return (loaded[-1] if loaded else None), None
