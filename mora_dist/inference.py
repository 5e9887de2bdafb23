"""A small inference API: a base model plus a saved MoRA adapter, and greedy generation."""

from __future__ import annotations

import os

from mora_dist.device import compute_device
from mora_dist.evaluation.generation import generate_texts
from mora_dist.base_model import load_model, load_tokenizer
from mora_dist.mora import load_adapter


def load_for_inference(model: str, adapter: str | os.PathLike | None = None, dtype: str = "float32",
                       trust_remote_code: bool = False):
    """Load ``model`` (a local folder, GGUF file or packaged name) and, if given, a MoRA adapter onto it.

    Returns:
        ``(model, tokenizer)`` in eval mode (the threshold δ applies as configured for inference), on the GPU when
        there is one.
    """
    tok = load_tokenizer(model, trust_remote_code=trust_remote_code)
    lm = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code).to(compute_device())
    if adapter is not None:
        load_adapter(lm, adapter)
    lm.eval()
    return lm, tok


def generate(model, tok, prompts: list[str], max_new_tokens: int = 32, chat_template: bool = True,
             batch_size: int = 8, system_prompt: str | None = None) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded, length-sorted batches, KV cache), without special tokens.

    ``system_prompt``: the system turn, as the adapter was trained with (``model.system_prompt``).
    """
    outputs = generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             chat_template=chat_template, system_prompt=system_prompt, distributed=False)
    return [o.strip() for o in outputs]
