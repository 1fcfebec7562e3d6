"""Servers for load runs: one SGLang server per method spelling, started and waited for; the model's
dimensions; the KVTC calibration a kvtc server runs with."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from kvsqueeze.backends.sglang.serving import ServeContext, ServerSpec, plan_server


def slug(label: str) -> str:
    """A label as a file name."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_")


def model_dims(model_path: Path) -> dict:
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return {"layers": int(cfg["num_hidden_layers"]),
            "kv_heads": int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
            "head_dim": int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]),
            "bytes_per_value": 2}


def server_dtype(server_args: list[str]) -> str:
    """The dtype servers run at: ``--dtype`` among their arguments, else the CPU default."""
    from kvsqueeze.backends.sglang.server import cpu_defaults, flag_value

    return flag_value(server_args, "--dtype") or cpu_defaults().get("--dtype") or "auto"


def kv_bytes_per_token(dims: dict, dtype: str) -> int:
    """Bytes of one token's K and V over every layer and KV head, at ``dtype`` (a dense cache's cost;
    DMS's held tokens are counted in these dense-token equivalents)."""
    from kvsqueeze.harness.axes import DTYPE_BYTES

    return 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * DTYPE_BYTES.get(dtype, 2)


def kvtc_calibration(model_path: Path, given: str | None, log=print) -> str:
    """The calibration the ``kvtc`` servers run with: the one given, the model's full one, or its
    quick one, made once and cached (so that ``kvsqueeze bench`` on a fresh install stays within its
    time budget); the report names which one served."""
    from kvsqueeze.methods.kvtc.calibrate import calibration_for
    from kvsqueeze.model import load_hf

    if given:
        return str(calibration_for(None, given=given))
    tok, model = load_hf(model_path)
    return str(calibration_for(model, tok, quick=True, log=log))


def start_server(m: ServerSpec, model_path: Path, calibration, logs: Path, extra: list[str], log=print,
                 env: dict | None = None, name: str | None = None, timeout: float = 400):
    """Start and wait for an SGLang server of ``m`` (a method spelling) on a free port, its log under
    ``logs``; ``env`` adds to its environment (core binding); ``name`` tells its log apart."""
    from kvsqueeze.backends.sglang.server import SGLangServer, free_port

    tag = name or slug(m.label)
    logs.mkdir(parents=True, exist_ok=True)
    ctx = ServeContext(model=model_path, log=log, calibration=calibration, quick_calibration=True,
                       stats_file=str(logs / f"{tag}-kvtc-stats.json"))
    plan = plan_server(m, ctx, extra)
    server = SGLangServer(model=model_path, port=free_port(), extra_args=plan.args + list(extra),
                          env={**plan.env, **(env or {})}, log_path=logs / f"server-{tag}.log")
    log(f"starting SGLang for {m.label} ({m.summary()}) ...")
    t0 = time.monotonic()
    server.start()
    try:
        server.wait_ready(timeout=timeout)
    except BaseException:
        server.stop()
        raise
    log(f"  ready at {server.url} after {time.monotonic() - t0:.0f}s")
    return server
