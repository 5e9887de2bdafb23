"""Model shapes without weights: built-in presets of common open models, or a local Hugging Face ``config.json``.

The capacity planner (``mora_dist.plan``) needs only the shape of a decoder-only transformer (vocabulary, width,
depth, heads, MLP width), never its weights, and never a hub: ``model.name`` is a preset name (case-insensitive,
e.g. ``llama-2-7b``), a local model folder with a ``config.json``, or the packaged ``smollm2-135m-instruct``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


class ShapeError(ValueError):
    """A model whose shape cannot be known here; the message names the setting and the fix."""


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-style decoder (RMSNorm, rotary attention with grouped KV heads, gated MLP).

    Attributes:
        name: preset name or config path.
        model_type: ``config.model_type`` (llama, gemma, mistral, qwen2, ...).
        vocab, hidden, intermediate, layers, heads, kv_heads, head_dim: the usual dimensions.
        tied: the output head shares the input embedding.
        attention_bias: q/k/v projections carry biases (qwen2).
    """

    name: str
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    attention_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each linear layer of a decoder block, by its module name."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_tensors(self) -> list[int]:
        """Element counts of the parameters of one decoder block (weights, biases, two norms)."""
        sizes = [din * dout for din, dout in self.linear_dims().values()]
        if self.attention_bias:
            sizes += [self.q_dim, self.kv_dim, self.kv_dim]
        return sizes + [self.hidden, self.hidden]

    def tensors(self) -> list[int]:
        """Element counts of every parameter tensor of the model (embedding, blocks, final norm, head)."""
        out = [self.vocab * self.hidden]
        for _ in range(self.layers):
            out += self.layer_tensors()
        out.append(self.hidden)
        if not self.tied:
            out.append(self.vocab * self.hidden)
        return out

    @property
    def params(self) -> int:
        return sum(self.tensors())

    def as_dict(self) -> dict:
        return {**asdict(self), "params": self.params}


def _llama(name, vocab, hidden, inter, layers, heads, kv, head_dim=None, tied=False, model_type="llama"):
    return ModelShape(name, model_type, vocab, hidden, inter, layers, heads, kv, head_dim or hidden // heads, tied)


PRESETS: dict[str, ModelShape] = {s.name: s for s in [
    _llama("llama-2-7b", 32000, 4096, 11008, 32, 32, 32),
    _llama("llama-2-13b", 32000, 5120, 13824, 40, 40, 40),
    _llama("llama-2-70b", 32000, 8192, 28672, 80, 64, 8),
    _llama("llama-3-8b", 128256, 4096, 14336, 32, 32, 8),
    _llama("llama-3-70b", 128256, 8192, 28672, 80, 64, 8),
    _llama("llama-3.2-1b", 128256, 2048, 8192, 16, 32, 8, head_dim=64, tied=True),
    _llama("llama-3.2-3b", 128256, 3072, 8192, 28, 24, 8, head_dim=128, tied=True),
    _llama("llama-1.1b", 32000, 2048, 5632, 22, 32, 4),  # TinyLlama-1.1B
    _llama("gemma-2b", 256000, 2048, 16384, 18, 8, 1, head_dim=256, tied=True, model_type="gemma"),
    _llama("gemma-7b", 256000, 3072, 24576, 28, 16, 16, head_dim=256, tied=True, model_type="gemma"),
    _llama("mistral-7b", 32000, 4096, 14336, 32, 32, 8, model_type="mistral"),
    _llama("smollm2-135m", 49152, 576, 1536, 30, 9, 3, head_dim=64, tied=True),
]}
# Other spellings of the presets (the packaged model and the usual hub names' last component).
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "tinyllama-1.1b": "llama-1.1b",
           "llama-2-7b-chat": "llama-2-7b", "llama-2-7b-hf": "llama-2-7b", "llama-2-7b-chat-hf": "llama-2-7b",
           "meta-llama-3-8b": "llama-3-8b", "meta-llama-3-8b-instruct": "llama-3-8b", "llama-3-8b-instruct": "llama-3-8b",
           "meta-llama-3-70b": "llama-3-70b", "meta-llama-3-70b-instruct": "llama-3-70b",
           "llama-3.2-1b-instruct": "llama-3.2-1b", "gemma-2b-it": "gemma-2b", "gemma-7b-it": "gemma-7b"}


def shape_from_config(data: dict, name: str) -> ModelShape:
    """A ``ModelShape`` from the fields of a Hugging Face ``config.json`` (text configs nested in
    ``text_config`` are read too)."""
    data = {**data.get("text_config", {}), **{k: v for k, v in data.items() if k != "text_config"}}
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(data.get(k), int)]
    if missing:
        raise ShapeError(f"{name}: config.json lacks {', '.join(missing)}; the planner reads Llama-style decoder "
                         "configs (or use a preset: " + ", ".join(sorted(PRESETS)) + ")")
    heads = data["num_attention_heads"]
    model_type = str(data.get("model_type", "llama"))
    return ModelShape(name=name, model_type=model_type, vocab=data["vocab_size"], hidden=data["hidden_size"],
                      intermediate=data["intermediate_size"], layers=data["num_hidden_layers"], heads=heads,
                      kv_heads=int(data.get("num_key_value_heads") or heads),
                      head_dim=int(data.get("head_dim") or data["hidden_size"] // heads),
                      tied=bool(data.get("tie_word_embeddings", model_type.startswith("gemma"))),
                      attention_bias=bool(data.get("attention_bias", model_type == "qwen2")))


def resolve_shape(model_name: str) -> ModelShape:
    """The shape named by ``model.name``: a preset (or alias), or a local folder / file path with ``config.json``.

    Raises:
        ShapeError: neither, listing the presets.
    """
    text = str(model_name)
    key = text.lower().rstrip("/").rsplit("/", 1)[-1]
    path = Path(text).expanduser()
    if path.is_dir() or path.name == "config.json":
        cfg_file = path if path.name == "config.json" else path / "config.json"
        if not cfg_file.is_file():
            raise ShapeError(f"model.name={text!r}: folder has no config.json; point it at a Hugging Face model "
                             "folder or use a preset: " + ", ".join(sorted(PRESETS)))
        return shape_from_config(json.loads(cfg_file.read_text()), str(cfg_file))
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    raise ShapeError(f"model.name={text!r}: not a local model folder nor a shape preset; presets: "
                     + ", ".join(sorted(PRESETS)) + " (a .gguf file: give its original config.json folder instead)")
