"""Task separation of the gate: how each stage's bank routes every seen task's test inputs over the blocks.

MoRA's case against forgetting rests on routing: a task's tokens should go to that task's block, so a later
block leaves earlier tasks' outputs alone. The statistics stage measures routing only on the task just trained.
This module measures it afterwards, for every stage adapter of a run directory, on the evaluation prompts of every
task seen by then (the prompts stored with the last stage's predictions), with the gate as it runs at inference:

- ``weight``: each block's share of the gate weight ``Σ w`` over the prompt tokens (padding excluded), averaged
  over layers;
- ``mass``: each block's share of the contribution mass ``Σ |w z| · ‖B‖``: how much of what the adapter adds to
  the layer's output comes from that block.

For each stage after the first, ``separation`` compares the new block's share on its own task's prompts with its
mean share on the earlier tasks' prompts: a ratio near 1 means the gate does not tell the tasks apart, and the
new block changes earlier tasks' outputs about as much as its own task's.

``mora-dist routing RUN_DIR`` writes ``RUN_DIR/routing/routing.json``, ``routing.md`` and ``routing.png``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from mora_dist.distributed.stats import collect_statistics, layer_block_shares, statistics_record
from mora_dist.evaluation.results import GENERAL_SAMPLES_SUFFIX

SHARES = ("weight", "mass")


def block_shares(model: nn.Module, batches: Iterable[dict]) -> dict:
    """Each block's share of the gate weight and of the contribution mass on ``batches``, averaged over layers.

    Args:
        model: a model with MoRA layers (every layer holds the same blocks, as ``inject_mora`` builds them).
        batches: dicts with ``input_ids`` and ``attention_mask`` (padding tokens are not counted).

    Returns:
        ``{"blocks": [names], "weight": [share per block], "mass": [...], "groups": {q_proj: {"weight": [...],
        "mass": [...]}, ...}, "tokens": n}``; each share list sums to 1 (all zeros where nothing was selected).
    """
    layers = statistics_record(collect_statistics(model, batches, check_lockstep=False, min_keep=None))["layers"]
    if not layers:
        raise ValueError("the model has no MoRA layers")
    per_group: dict[str, dict[str, list[list[float]]]] = {}
    names = None
    for lname, layer in layers.items():
        blocks = [b["name"] for b in layer["blocks"]]
        if names is None:
            names = blocks
        elif blocks != names:
            raise ValueError(f"{lname}: blocks {blocks} differ from other layers' {names}")
        group = per_group.setdefault(lname.rsplit(".", 1)[-1], {key: [] for key in SHARES})
        for key, field in (("weight", "weight_sum"), ("mass", "mass")):
            group[key].append(layer_block_shares(layer, field))

    def mean(rows: list[list[float]]) -> list[float]:
        return [sum(col) / len(rows) for col in zip(*rows)]

    groups = {g: {key: mean(v[key]) for key in SHARES} for g, v in per_group.items()}
    every = {key: [row for v in per_group.values() for row in v[key]] for key in SHARES}
    return {"blocks": names, **{key: mean(every[key]) for key in SHARES}, "groups": groups,
            "tokens": next(iter(layers.values()))["tokens"]}


def prompt_batches(tok, prompts: Sequence[str], *, chat_template: bool, system_prompt: str | None,
                   max_length: int, batch_size: int = 8, last_token: bool = False) -> list[dict]:
    """Batches of formatted prompts as evaluation feeds them (cut from the left to ``max_length``), padded on the
    right: under the causal mask every prompt token then sees exactly what it sees unpadded, at the same
    positions, and the padding (masked out of the statistics) comes after it. ``last_token``: count only each
    prompt's last token, the position whose output is the first answer token (``stats_mask``)."""
    from mora_dist.data.tokenize import format_prompt

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = [tok(format_prompt(tok, p, chat_template, system_prompt),
                   add_special_tokens=not chat_template)["input_ids"][-max_length:]
               for p in prompts[i:i + batch_size]]
        width = max(len(ids) for ids in enc)
        batch = {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in enc]),
                 "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in enc])}
        if last_token:
            batch["stats_mask"] = torch.tensor([[0] * (len(ids) - 1) + [1] + [0] * (width - len(ids))
                                                for ids in enc])
        out.append(batch)
    return out


def _stage_index(name: str) -> int:
    m = re.match(r"stage_(\d+)_", name)
    return int(m.group(1)) if m else -1


def stored_prompts(run_dir: Path) -> dict[str, list[str]]:
    """The evaluation prompts of every task seen so far, from the latest stage's stored predictions (every stage
    evaluates all tasks seen by then on the same examples)."""
    files = sorted((p for p in (run_dir / "eval").glob("stage_*.samples.json")
                    if not p.name.endswith(GENERAL_SAMPLES_SUFFIX)), key=lambda p: _stage_index(p.name))
    if not files:
        from mora_dist.run.state import RunStateError

        raise RunStateError(f"{run_dir / 'eval'}: no stored predictions (stage_*.samples.json); run the stream "
                            "first (mora-dist run)")
    return {task: [s["prompt"] for s in samples] for task, samples in json.loads(files[-1].read_text()).items()}


def separation(stages: Sequence[dict], key: str = "mass") -> list[dict]:
    """Per stage after the first: the new block's share on its own task's prompts and its mean share on the
    earlier tasks' prompts, and their ratio (own / earlier; near 1: the gate does not separate the tasks)."""
    rows = []
    for st in stages:
        blocks = st["blocks"]
        if len(blocks) < 2 or blocks[-1] not in st["tasks"]:
            continue
        new = len(blocks) - 1
        own = st["tasks"][blocks[-1]][key][new]
        earlier = [st["tasks"][b][key][new] for b in blocks[:-1] if b in st["tasks"]]
        if not earlier:
            continue
        mean_earlier = sum(earlier) / len(earlier)
        rows.append({"stage": st["stage"], "new_block": blocks[-1], "own": own, "earlier": mean_earlier,
                     "ratio": own / mean_earlier if mean_earlier > 0 else None})
    return rows


def measure_run(run_dir: str | os.PathLike, *, examples: int = 20, batch_size: int = 8,
                final_only: bool = False, tokens: str = "all") -> dict:
    """Routing of every stage adapter of ``run_dir`` (or only the last) on every seen task's stored prompts, over
    all their tokens (``tokens="all"``) or only each prompt's last one (``"last"``: where the answer starts).

    Raises:
        RunStateError: not a run directory, or no stage adapters or stored predictions in it yet.
        ConfigError: the run's gate is ``none`` (seq_lora, olora): there is no routing to measure.
    """
    from mora_dist.config import ConfigError, load_config
    from mora_dist.inference import load_for_inference
    from mora_dist.mora import load_adapter
    from mora_dist.run.state import RunStateError

    if tokens not in ("all", "last"):
        raise ValueError(f"tokens={tokens!r}: choose 'all' or 'last'")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunStateError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.mora.gate == "none":
        raise ConfigError(f"{run_dir / 'config.yaml'}: mora.gate is 'none' (method {cfg.method}): every block takes "
                         "part on every token, there is no routing to measure")
    adapters = sorted(p for p in (run_dir / "adapters").glob("*") if (p / "adapter.json").is_file()) \
        if (run_dir / "adapters").is_dir() else []
    if not adapters:
        raise RunStateError(f"{run_dir / 'adapters'}: no stage adapters yet; run the stream first (mora-dist run)")
    if final_only:
        adapters = adapters[-1:]
    prompts = stored_prompts(run_dir)
    model, tok = load_for_inference(cfg.model.name, dtype=cfg.model.dtype,
                                    trust_remote_code=cfg.model.trust_remote_code)
    batches = {task: prompt_batches(tok, p[:examples], chat_template=cfg.model.chat_template,
                                    system_prompt=cfg.model.system_prompt, max_length=cfg.model.max_length,
                                    batch_size=batch_size, last_token=tokens == "last")
               for task, p in prompts.items() if p}
    stages = []
    with torch.no_grad():
        for adapter in adapters:
            load_adapter(model, adapter)
            model.eval()
            blocks = json.loads((adapter / "adapter.json").read_text())["blocks"]
            seen = [b["name"] for b in blocks if b["name"] in batches]
            stage = {"stage": adapter.name, "blocks": [b["name"] for b in blocks], "tasks": {}}
            for task in seen:
                stage["tasks"][task] = block_shares(model, batches[task])
            stages.append(stage)
    return {"run_dir": str(run_dir), "method": cfg.method, "examples": examples, "tokens": tokens,
            "gate": {"gate": cfg.mora.gate, "k": cfg.mora.k, "tau": cfg.mora.tau, "delta": cfg.mora.delta},
            "stages": stages, "separation": {key: separation(stages, key) for key in SHARES}}


def render_markdown(result: dict) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}%"

    g = result["gate"]
    lines = [f"# Routing: {Path(result['run_dir']).name}", "",
             f"Gate `{g['gate']}` (k={g['k']}, tau={g['tau']}, delta={g['delta']}), at inference, on the first "
             f"{result['examples']} stored evaluation prompts of every task seen by each stage ("
             + ("all their tokens" if result.get("tokens", "all") == "all" else
                "only each prompt's last token, where the answer starts") + "). Cells: each block's "
             "share of the gate weight / of the contribution mass Σ|w z|·‖B‖ (what the block adds to the layer "
             "outputs), averaged over the adapted layers. A gate that separates tasks puts each task's share "
             "on its own block.", ""]
    for st in result["stages"]:
        lines += [f"## After {st['stage']}", "",
                  "| prompts of \\ block | " + " | ".join(st["blocks"]) + " |",
                  "|---|" + "---|" * len(st["blocks"])]
        for task, sh in st["tasks"].items():
            lines.append(f"| {task} | " + " | ".join(f"{pct(w)} / {pct(m)}" for w, m in zip(sh["weight"], sh["mass"]))
                         + " |")
        lines.append("")
    sep = result["separation"]
    if sep["mass"]:
        lines += ["## Separation", "",
                  "The new block's share on its own task's prompts against its mean share on the earlier tasks' "
                  "prompts. Ratio near 1: the gate does not tell the tasks apart, and the new block acts on earlier "
                  "tasks about as much as on its own.", "",
                  "| stage | new block | own (weight) | earlier (weight) | ratio "
                  "| own (mass) | earlier (mass) | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for w, m in zip(sep["weight"], sep["mass"]):
            ratio = [("–" if r["ratio"] is None else f"{r['ratio']:.2f}") for r in (w, m)]
            lines.append(f"| {w['stage']} | {w['new_block']} | {pct(w['own'])} | {pct(w['earlier'])} | {ratio[0]} | "
                         f"{pct(m['own'])} | {pct(m['earlier'])} | {ratio[1]} |")
        lines.append("")
    lines += ["![routing](routing.png)", ""]
    return "\n".join(lines)


def write_routing(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """routing.json, routing.md and routing.png (the last stage's mass shares) under ``out_dir``, atomically."""
    from mora_dist.evaluation.report import _heatmap
    from mora_dist.io import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "routing.json", result)
    atomic_write_text(out / "routing.md", render_markdown(result))
    last = result["stages"][-1]
    tasks = list(last["tasks"])
    png = out / "routing.png"
    tmp = out / "routing.tmp.png"
    _heatmap([last["tasks"][t]["mass"] for t in tasks], tasks, last["blocks"],
             f"Share of the adapter output per block, after {last['stage']}", "block", "prompts of task",
             "share of Σ|w z|·‖B‖", tmp)
    os.replace(tmp, png)
    return [out / "routing.json", out / "routing.md", png]
