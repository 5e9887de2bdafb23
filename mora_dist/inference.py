"""A small inference API: a base model plus a saved MoRA adapter, and greedy generation."""

from __future__ import annotations

import os

import torch

from mora_dist.data.tokenize import format_prompt
from mora_dist.models import load_model, load_tokenizer
from mora_dist.mora import load_adapter


def load_for_inference(model: str, adapter: str | os.PathLike | None = None, dtype: str = "float32",
                       trust_remote_code: bool = False):
    """Load ``model`` (a local folder, GGUF file or packaged name) and, if given, a MoRA adapter onto it.

    Returns:
        ``(model, tokenizer)`` in eval mode (the threshold δ applies as configured for inference).
    """
    tok = load_tokenizer(model, trust_remote_code=trust_remote_code)
    lm = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter is not None:
        load_adapter(lm, adapter)
    lm.eval()
    return lm, tok


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int = 32, chat_template: bool = True,
             batch_size: int = 8) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches, KV cache), decoded without special tokens."""
    tok.padding_side = "left"
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [format_prompt(tok, p, chat_template) for p in prompts[start:start + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            outputs.append(tok.decode(row, skip_special_tokens=True).strip())
    return outputs
