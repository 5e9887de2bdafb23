"""Turning ``{"prompt", "answer"}`` pairs into training tensors: loss on answer tokens only, over-long prompts
cut from the left (never the answer), counts reported."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass
class EncodeReport:
    """What tokenisation did to a task's examples."""

    examples: int = 0
    truncated_prompts: int = 0
    skipped_long_answers: int = 0
    tokens: int = 0
    skipped_indices: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"examples": self.examples, "truncated_prompts": self.truncated_prompts,
                "skipped_long_answers": self.skipped_long_answers, "tokens": self.tokens}


def format_prompt(tok, prompt: str, chat_template: bool, system_prompt: str | None = None) -> str:
    """The prompt text the model sees, in training and in evaluation alike: one user turn of the tokenizer's chat
    template with a generation prompt (after a system turn unless ``system_prompt`` is ``None``, which leaves the
    template's default), or the prompt as is when the template is off or the tokenizer has none."""
    if not (chat_template and getattr(tok, "chat_template", None)):
        return prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_examples(tok, examples, max_length: int, chat_template: bool = True, system_prompt: str | None = None
                    ) -> tuple[list[dict], EncodeReport]:
    """Tokenise examples for training.

    Each item has ``input_ids`` and ``labels`` (``-100`` on prompt tokens). The answer is followed by the EOS
    token. A prompt that does not fit is cut from the left; an answer that alone does not fit (with at least
    one prompt token) is skipped and counted.
    """
    report = EncodeReport()
    out = []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for i, ex in enumerate(examples):
        p_ids = tok(format_prompt(tok, ex["prompt"], chat_template, system_prompt),
                    add_special_tokens=False)["input_ids"]
        a_ids = tok(ex["answer"], add_special_tokens=False)["input_ids"] + eos
        if len(a_ids) + 1 > max_length:
            report.skipped_long_answers += 1
            report.skipped_indices.append(i)
            continue
        room = max_length - len(a_ids)
        if len(p_ids) > room:
            p_ids = p_ids[len(p_ids) - room:]
            report.truncated_prompts += 1
        ids = p_ids + a_ids
        out.append({"input_ids": ids, "labels": [IGNORE] * len(p_ids) + a_ids})
        report.tokens += len(ids)
    report.examples = len(out)
    return out, report


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a training batch."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        ids[r, :n] = torch.tensor(it["input_ids"])
        labels[r, :n] = torch.tensor(it["labels"])
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
