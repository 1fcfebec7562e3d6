"""DMS checkpoints: kvsqueeze's (``dms_config.json`` + ``dms_gates.safetensors``, from ``kvsqueeze dms
train``), the released Model-Optimizer format (``dms_*`` keys in ``config.json``, gate tensors named
``model.layers.N.self_attn.dms_proj_alpha[_norm].weight``), and the gates shipped for the embedded
model. The released names are written here once, for loading and for the TensorRT-LLM export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.methods.dms.config import CONFIG_FILE, GATES_FILE, DMSConfig
from kvsqueeze.methods.dms.gates import DMSGates

_RELEASED_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(dms_proj_alpha(?:_norm)?)\.(weight|bias)$")
GATE_PARTS = ("dms_proj_alpha", "dms_proj_alpha_norm")


def released_name(layer: int, part: str) -> str:
    """The released checkpoint's name of one gate tensor (``part``: one of :data:`GATE_PARTS`)."""
    return f"model.layers.{layer}.self_attn.{part}.weight"


def is_released_checkpoint(directory: Path) -> bool:
    """A checkpoint in the released Model-Optimizer format (``dms_*`` keys in config.json)."""
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "dms_window_size" in json.loads(cfg.read_text())
    except ValueError:
        return False


def released_config(directory: Path) -> DMSConfig:
    """Map the released config keys onto :class:`DMSConfig` (see docs/dms.md)."""
    c = json.loads((Path(directory) / "config.json").read_text())
    return DMSConfig(
        window=int(c["dms_window_size"]),
        sinks=0,  # the released code keeps no attention sinks
        gate="projection" if c.get("dms_separate_alpha", False) else "query_neuron",
        granularity=c.get("dms_alpha_per", "head"),
        target_ratio=float(c.get("dms_cr", 8)),
        tau=float(c.get("dms_tau", 0.1)),
        logit_scale=float(c.get("dms_alpha_scale", 100.0)),
        logit_bias=-float(c.get("dms_initial_alpha_offset", 5.0)),
        evict=not bool(c.get("dms_disable_eviction", False)),
    )


def load_config(directory: Path) -> DMSConfig:
    """The DMS config of a kvsqueeze checkpoint, or of a released Model-Optimizer one."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() and is_released_checkpoint(directory):
        return released_config(directory)
    return DMSConfig.load(directory)


def _released_gate_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                m = _RELEASED_KEY.match(key)
                if m:
                    if m.group(3) == "bias":
                        raise KvsqueezeError(f"{f}: {key}: gate projections with a bias are not "
                                             "supported; expected bias-free dms_proj_alpha")
                    out[f"layers.{m.group(1)}.{m.group(2)}.weight"] = fh.get_tensor(key)
    return out


def load_gates(directory: Path, model) -> DMSGates:
    """Gates from a kvsqueeze checkpoint or from a released Model-Optimizer DMS checkpoint."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = load_config(directory)
    if not (directory / CONFIG_FILE).is_file():  # released layout (load_config checked it)
        gates = DMSGates.for_model(model, cfg)
        state = _released_gate_tensors(directory)
        if cfg.gate == "projection" and not state:
            raise KvsqueezeError(f"checkpoint={str(directory)!r}: config says dms_separate_alpha but no "
                                 "model.layers.*.self_attn.dms_proj_alpha tensors were found")
        try:
            gates.load_state_dict(state)
        except RuntimeError as exc:
            raise KvsqueezeError(f"{directory}: DMS gate parameters do not fit this model ({exc})") from exc
        return gates.to(next(model.parameters()).dtype)
    gates = DMSGates.for_model(model, cfg)
    path = directory / GATES_FILE
    if not path.is_file():
        raise KvsqueezeError(f"checkpoint={str(directory)!r}: {GATES_FILE} is missing; expected the DMS "
                             "gate parameters written by `kvsqueeze dms train`")
    state = {k: v for k, v in load_file(str(path)).items() if k != "_empty"}
    try:
        gates.load_state_dict(state)
    except RuntimeError as exc:
        raise KvsqueezeError(f"{path}: gate parameters do not fit this model ({exc})") from exc
    return gates


def released_tensors(gates: DMSGates) -> dict[str, torch.Tensor]:
    """The projection gates' tensors under the released names (for an exported checkpoint)."""
    out = {}
    for i, layer in enumerate(gates.layers):
        for part in GATE_PARTS:
            out[released_name(i, part)] = getattr(layer, part).weight.detach().contiguous()
    return out


def split_released(weights: dict, n_layers: int, gate: str = "projection"
                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Separate a checkpoint's DMS gate tensors (released names) from the model's own weights; every
    layer's are required for projection gates, none for query-neuron gates (which have none)."""
    rest, gates = {}, {}
    for name, tensor in weights.items():
        (gates if ".dms_proj_alpha" in name else rest)[name] = tensor
    want = {released_name(i, p) for i in range(n_layers) for p in GATE_PARTS} if gate == "projection" else set()
    missing = sorted(want - set(gates))
    if missing:
        raise KvsqueezeError(f"DMS checkpoint: {len(missing)} gate tensors missing (first: {missing[0]}); "
                             "expected one dms_proj_alpha and dms_proj_alpha_norm weight per layer")
    return rest, gates


def load_released_tensors(gates: DMSGates, tensors: dict[str, torch.Tensor]) -> None:
    """Copy gate tensors under the released names into ``gates``."""
    for i, layer in enumerate(gates.layers):
        with torch.no_grad():
            for part in GATE_PARTS:
                getattr(layer, part).weight.copy_(tensors[released_name(i, part)])


SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "dms"


def shipped_gates_dir(ratio: float) -> Path:
    """The gates shipped for the embedded model at ``ratio`` (may not exist: check ``is_dir()``)."""
    return SHIPPED_DIR / f"smollm2-135m-{float(ratio):g}x"


def shipped_ratios() -> list[float]:
    return sorted(float(p.name.rsplit("-", 1)[1].rstrip("x")) for p in SHIPPED_DIR.glob("smollm2-135m-*x")
                  if p.is_dir())
