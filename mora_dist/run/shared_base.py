"""The base model's evaluation, shared by the runs of one comparison.

Every method of ``mora-dist compare`` starts from the same base model, evaluated on the same test examples with the
same settings, so its ``base/evaluate`` stage (the row the forgetting and transfer metrics are measured from) is
the same for all of them. The first run computes it; the others copy its results when everything that decides
them is equal: the model, evaluation, data and distributed settings, and each task's data and evaluation fields
(not the method, adapter or training settings, which the base model does not have yet). Otherwise, or when the
first run has not evaluated its base yet, a run evaluates its own. A method run as its own job (``compare
--methods seq_lora``) looks for that source among the comparison's other run directories (``sibling_with_base``):
whichever job evaluated the base model first spares the others the evaluation.
"""

from __future__ import annotations

from pathlib import Path

from mora_dist.config import ConfigError, RunConfig, load_config
from mora_dist.io import atomic_write_json, read_json
from mora_dist.run.state import BASE_STAGE

_TASK_TRAINING_FIELDS = ("epochs", "max_steps", "lr")


def base_eval_key(cfg: RunConfig) -> dict:
    """Everything a run's base evaluation depends on."""
    tasks = [{k: v for k, v in vars(t).items() if k not in _TASK_TRAINING_FIELDS} for t in cfg.tasks]
    return {"model": vars(cfg.model), "eval": vars(cfg.eval), "data": vars(cfg.data),
            "distributed": vars(cfg.distributed), "tasks": tasks}


def reusable_base(source: Path, cfg: RunConfig) -> dict | None:
    """The recorded outcome of ``source``'s base evaluation when ``cfg``'s would be the same, else ``None``."""
    state_file, config_file = source / "state.json", source / "config.yaml"
    if not (state_file.is_file() and config_file.is_file()):
        return None
    done = {d["stage"]: d for d in read_json(state_file).get("done", [])}
    if BASE_STAGE not in done or base_eval_key(load_config(config_file)) != base_eval_key(cfg):
        return None
    return done[BASE_STAGE].get("info") or {}


def copy_base(source: Path, target: Path) -> None:
    """Copy ``source``'s base results (and per-example predictions and general-suite scores) into ``target``'s
    ``eval/`` folder, the results file last (it marks the copy complete)."""
    from mora_dist.evaluation.results import general_samples_path, stage_filename

    name = stage_filename(0, None)
    data = read_json(source / "eval" / name)
    data.setdefault("config", {}).update({"run_dir": str(target), "base_results_from": str(source)})
    for samples in (source / "eval" / Path(name).with_suffix(".samples.json").name,
                    general_samples_path(source / "eval" / name)):
        if samples.is_file():
            atomic_write_json(target / "eval" / samples.name, read_json(samples))
    atomic_write_json(target / "eval" / name, data)


def sibling_with_base(prefix: str | Path, cfg: RunConfig) -> Path | None:
    """A run directory of the same comparison (``<prefix>-<method>[-seed<S>]``, not ``cfg``'s own) whose base
    evaluation ``cfg``'s run may copy (``reusable_base``), the first in name order; ``None`` when there is none."""
    prefix, own = Path(prefix), Path(cfg.run_dir).resolve()
    if not prefix.parent.is_dir():
        return None
    for path in sorted(prefix.parent.glob(f"{prefix.name}-*")):
        if path.is_dir() and path.resolve() != own and path.name != f"{prefix.name}-compare":
            try:
                if reusable_base(path, cfg) is not None:
                    return path
            except (ConfigError, OSError, ValueError):  # unreadable (a bad config or state): not a source
                continue
    return None
