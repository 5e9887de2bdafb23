"""The converted-GGUF cache: the first load writes it, later loads read it, and what they read is the model and
tokenizer a direct GGUF load gives (weights bit for bit, tokens, chat template)."""

from __future__ import annotations

import pytest
import torch

from mora_dist.base_model import (
    ModelSourceError, converted_dir, load_model, load_tokenizer, local_source, resolve_model,
)


TEXTS = ["What is the topic of the following paragraph? Option: Company, Artist", "  spaces\tand\nnewlines ünï"]


def _direct(monkeypatch):
    monkeypatch.setenv("MORA_MODEL_CACHE", "off")
    return load_tokenizer("smollm2-135m-instruct"), load_model("smollm2-135m-instruct")


@pytest.mark.slow  # loads the real model three times
def test_cached_gguf_conversion_is_the_direct_load(tmp_path, monkeypatch):
    try:
        src = resolve_model("smollm2-135m-instruct")
    except ModelSourceError as err:  # pragma: no cover - depends on the machine
        pytest.skip(str(err))
    tok0, model0 = _direct(monkeypatch)
    assert local_source("smollm2-135m-instruct") == src  # cache off: the GGUF file itself

    monkeypatch.setenv("MORA_MODEL_CACHE", str(tmp_path / "cache"))
    target = converted_dir(src)
    assert target is not None and target.parent == tmp_path / "cache" and not target.exists()
    tok1 = load_tokenizer("smollm2-135m-instruct")  # converts and writes the cache
    assert (target / "converted.json").is_file() and list(target.glob("*.safetensors"))
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert local_source("smollm2-135m-instruct").directory == target
    model1 = load_model("smollm2-135m-instruct")

    sd0, sd1 = model0.state_dict(), model1.state_dict()
    assert sd0.keys() == sd1.keys()
    for name in sd0:
        assert torch.equal(sd0[name], sd1[name]), name
    assert model1.config.tie_word_embeddings == model0.config.tie_word_embeddings
    assert getattr(model1.config, "quantization_config", None) is None
    for text in TEXTS:
        assert tok1(text)["input_ids"] == tok0(text)["input_ids"]
    messages = [{"role": "user", "content": TEXTS[0]}]
    assert (tok1.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == tok0.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (tok1.pad_token_id, tok1.eos_token_id, tok1.padding_side) == (tok0.pad_token_id, tok0.eos_token_id,
                                                                         tok0.padding_side)

    # a folder without its completion marker (a crash while writing) is not used but written again; writing it
    # removes the folders converted earlier from the same file (another content or transformers version)
    import json

    for name, gguf in (("stale", src.directory / src.gguf_file), ("other", tmp_path / "other.gguf")):
        (target.parent / name).mkdir()
        (target.parent / name / "converted.json").write_text(json.dumps({"gguf": str(gguf)}))
    (target / "converted.json").unlink()
    assert local_source("smollm2-135m-instruct").directory == target
    assert (target / "converted.json").is_file()
    assert not (target.parent / "stale").exists() and (target.parent / "other").is_dir()


def test_cache_key_follows_content_not_modification_time(tmp_path, monkeypatch):
    """A reinstalled copy of the same file (new mtime) maps to the same folder; other content to another."""
    import os

    from mora_dist.base_model import ModelSource, file_fingerprint

    monkeypatch.setenv("MORA_MODEL_CACHE", str(tmp_path / "cache"))
    data = bytes(range(256)) * 4096 * 3  # 3 MiB
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "m.gguf").write_bytes(data)
    (tmp_path / "b" / "m.gguf").write_bytes(data)
    os.utime(tmp_path / "b" / "m.gguf", ns=(1, 1))
    changed = bytearray(data)
    changed[100] ^= 1  # one bit inside the first sampled chunk
    (tmp_path / "c" / "m.gguf").write_bytes(bytes(changed))
    keys = [converted_dir(ModelSource(tmp_path / n, "m.gguf")) for n in ("a", "b", "c")]
    assert keys[0] == keys[1] and keys[0] != keys[2]
    assert file_fingerprint(tmp_path / "a" / "m.gguf") != file_fingerprint(tmp_path / "c" / "m.gguf")
    (tmp_path / "d.gguf").write_bytes(b"short")  # smaller than one chunk
    assert len(file_fingerprint(tmp_path / "d.gguf")) == 16
