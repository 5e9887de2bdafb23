"""Code the tests share (fixtures and hooks stay in the ``conftest.py`` files; no test module imports another).

Here: the repository's paths and the tiny models and tokenizers built in code. Submodules: ``reference`` (an
independent float64 re-derivation of the MoRA layer), ``runs`` (run configs and ``mora-dist run`` under each
launcher), ``tiny_stream`` (the two-task stream compared across launchers and world sizes), ``multinode_hosts``
(two hosts made of network namespaces).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The TRACE-style task folders (the same variable the configs read).
CL_DATA = Path(os.environ.get("MORA_DATA_ROOT", REPO.parent / "shared" / "data" / "llm-cl-benchmark-500"))


def tiny_llama_config(**overrides):
    """A 2-layer Llama small enough for unit tests."""
    from transformers import LlamaConfig

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII, with <pad>, <s>, </s>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + list(string.printable))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
