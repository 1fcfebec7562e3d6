"""One serving spec per method: what it takes to run a method in an SGLang server.

``kvsqueeze serve``, ``kvsqueeze bench`` and the serving benchmarks all start servers from here. A
server runs one method, or several that compose, written ``METHOD[:SETTING[:VARIANT]]`` joined by
``+`` (the same spelling as ``kvsqueeze eval``; the setting and the variant mean what the method
says, :meth:`kvsqueeze.methods.base.CompressionMethod.spec_options`):

==========  ==================================================  ======================
method      what the server runs                                default setting
==========  ==================================================  ======================
``none``    stock SGLang (radix prefix cache, no compression)   --
``dms``     DMS: the gates in the model, K/V in a per-head       ``dms:4`` (shipped
            slot pool where evicted tokens free their slots      gates; or ``dms:DIR``)
``kvtc``    the hierarchical cache with the KVTC-compressed      ``kvtc:8``
            storage tier (radix-cache pages kept compressed)
``fusion``  near-duplicate full pages fused into shared,         ``fusion:0.9:token``
            reference-counted pages of SGLang's paged pool
==========  ==================================================  ======================

``kvtc`` composes with ``fusion`` (``kvtc:8+fusion:0.9:token``: fused pages are stored and restored
like any radix-cache page). ``dms`` runs alone: its K/V live outside SGLang's token pool, which the
storage tier and fusion work on; such a combination is refused before anything starts, with the
reason. Every server gets ``--enable-metrics`` (kvsqueeze's figures are on ``/metrics``).

A spec resolves to a :class:`ServerPlan`: SGLang flags and environment for the server process, and
notes to print. Flags the user gives win over a plan's defaults; flags a method cannot run with are
refused with the reason.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvsqueeze.backends.sglang.server import flag_value, has_flag
from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.methods.base import MethodSpec, get, parse_spec

METRICS_FLAG = "--enable-metrics"


@dataclass
class ServeContext:
    """What a server plan may need beside the spec: the model, and per-method options."""

    model: Path
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    calibration: str | None = None  # kvtc: a calibration file (default: the model's, found or made)
    quick_calibration: bool = False  # kvtc: a quick calibration where the model has no full one
    store_dir: str | None = None  # kvtc: keep the store in this directory (default: host memory)
    stats_file: str | None = None  # kvtc: where the storage tier publishes its figures (JSON)
    fusion_layers: str | None = None  # fusion: the layers whose similarity decides


@dataclass
class ServerPlan:
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class ServingSpec:
    """How one method runs in an SGLang server. Subclasses set ``name``, ``summary`` and
    ``default_setting`` and implement :meth:`resolve` and :meth:`plan`."""

    name: str
    summary: str
    default_setting: str | None = None
    default_variant: str | None = None
    default_page_size: int | None = None  # SGLang's --page-size the method runs with by default
    refused_flags: dict[str, str] = {}  # SGLang flag -> why this method cannot run with it

    def resolve(self, spec: MethodSpec) -> MethodSpec:
        """The spec with its defaults filled in and its setting checked (nothing is started)."""
        out = MethodSpec(self.name, spec.setting if spec.setting is not None else self.default_setting,
                         spec.variant if spec.variant is not None else self.default_variant)
        self.options(out)
        return out

    def options(self, spec: MethodSpec) -> dict:
        """The method's options for this spec, as ``kvsqueeze eval`` reads it."""
        return get(self.name).spec_options(spec.setting, spec.variant)

    def check(self, spec: MethodSpec, ctx: "ServeContext", args: list[str]) -> None:
        """Refuse the SGLang flags (``args``: the user's and the plan's) this method cannot run with,
        before anything is loaded or started."""
        for flag, why in self.refused_flags.items():
            if has_flag(args, flag):
                raise bad_value(flag.lstrip("-"), "given", f"not given with {self.name}: {why}")

    def plan(self, spec: MethodSpec, ctx: ServeContext, args: list[str]) -> ServerPlan:
        raise NotImplementedError


class NoneSpec(ServingSpec):
    name = "none"
    summary = "stock SGLang (radix prefix cache, no compression)"

    def options(self, spec):
        if spec.setting is not None or spec.variant is not None:
            raise bad_value("method", spec.label, "none without a setting")
        return {}

    def plan(self, spec, ctx, args):
        return ServerPlan()


KVTC_MIN_PAGE = 16
KVTC_DEFAULT_PAGE = 64


def kvtc_store_args(calibration: str, ratio: float, directory: str | None = None,
                    stats_file: str | None = None, page_size: int | None = KVTC_DEFAULT_PAGE) -> list[str]:
    """SGLang flags that turn on the hierarchical cache with the KVTC storage tier.

    ``wait_complete``: a request waits for its prefix to be restored from storage (the best-effort
    default gives up on a slow tier and recomputes). ``layer_first`` + ``direct`` is the host-pool
    layout and transfer path kvsqueeze's CPU shim and storage backend support.
    """
    extra = {"backend_name": "kvtc", "module_path": "kvsqueeze.backends.sglang.kvtc_storage",
             "class_name": "KVTCHiCacheStorage", "interface_v1": 1,
             "hicache_storage_pass_prefix_keys": True, "kvtc_calibration": str(calibration),
             "kvtc_ratio": float(ratio), "kvtc_dir": str(directory) if directory else None,
             "kvtc_stats_file": stats_file}
    return (["--page-size", str(page_size)] if page_size is not None else []) + ["--enable-hierarchical-cache",
            "--hicache-io-backend", "direct", "--hicache-mem-layout", "layer_first",
            "--hicache-storage-prefetch-policy", "wait_complete",
            "--hicache-storage-backend", "dynamic",
            "--hicache-storage-backend-extra-config", json.dumps(extra)]


class KVTCSpec(ServingSpec):
    name = "kvtc"
    summary = "SGLang's hierarchical cache with the KVTC-compressed storage tier"
    default_setting = "8"
    default_page_size = KVTC_DEFAULT_PAGE
    refused_flags = {
        "--enable-hierarchical-cache": "the KVTC tier sets the hierarchical cache up itself",
        "--hicache-storage-backend": "the KVTC tier is the storage backend",
        "--disable-radix-cache": "the storage tier keeps radix-cache pages",
    }

    def options(self, spec):
        opts = super().options(spec)
        if not opts.get("ratio", 0) >= 1:
            raise bad_value("method", spec.label, "kvtc:RATIO with RATIO a number >= 1")
        return opts

    def page_size(self, args: list[str]) -> int:
        raw = flag_value(args, "--page-size")
        if raw is None:
            return KVTC_DEFAULT_PAGE
        if not raw.isdigit() or int(raw) < KVTC_MIN_PAGE:
            raise bad_value("page-size", raw, f"at least {KVTC_MIN_PAGE} tokens with kvtc (KVTC codes pages)")
        return int(raw)

    def check(self, spec, ctx, args):
        super().check(spec, ctx, args)
        self.page_size(args)
        if ctx.calibration and not Path(ctx.calibration).is_file():
            raise bad_value("calibration", ctx.calibration, "an existing KVTC calibration file")

    def plan(self, spec, ctx, args):
        from kvsqueeze.methods.kvtc.calibrate import calibration_for
        from kvsqueeze.model import load_hf

        ratio = self.options(spec)["ratio"]
        if ctx.calibration:
            calibration = calibration_for(None, given=ctx.calibration)
        else:
            tok, model = load_hf(ctx.model)
            calibration = calibration_for(model, tok, quick=ctx.quick_calibration, log=ctx.log)
            del model
        ps = self.page_size(args)
        flags = kvtc_store_args(str(calibration), ratio, ctx.store_dir, ctx.stats_file, page_size=None)
        return ServerPlan(flags, notes=[f"KVTC storage tier: ratio {ratio:g}, calibration {calibration}, "
                                        f"{'directory ' + ctx.store_dir if ctx.store_dir else 'host memory'}, "
                                        f"page size {ps}"])


FUSION_DEFAULT_PAGE = 16


class FusionSpec(ServingSpec):
    name = "fusion"
    summary = "near-duplicate full pages fused into shared, reference-counted pages of SGLang's pool"
    default_setting = "0.9"
    default_variant = "token"
    default_page_size = FUSION_DEFAULT_PAGE
    refused_flags = {"--disable-radix-cache": "fusion works on the radix cache's paged pool"}

    def config(self, spec: MethodSpec, layers: str | None = None):
        from kvsqueeze.methods.fusion.config import FusionConfig

        opts = super().options(spec)
        return FusionConfig(threshold=opts["threshold"], similarity=opts["similarity"], layers=layers)

    def options(self, spec):
        self.config(spec)  # the threshold and similarity checked
        return super().options(spec)

    def check(self, spec, ctx, args):
        super().check(spec, ctx, args)
        self.config(spec, ctx.fusion_layers)
        raw = flag_value(args, "--page-size")
        if raw is None or not raw.isdigit() or int(raw) < 2:
            raise bad_value("page-size", raw, "a page size above 1 with fusion (it shares whole pages; "
                            "page size 1 has none to share)")

    def plan(self, spec, ctx, args):
        from kvsqueeze.backends.sglang.fusion import config_env

        cfg = self.config(spec, ctx.fusion_layers)
        raw = flag_value(args, "--page-size")
        return ServerPlan([], config_env(cfg), [f"block fusion: threshold {cfg.threshold:g}, "
                                                f"{cfg.similarity} similarity, page size {raw}"])


DMS_FLAGS = (("--attention-backend", "dms"), ("--radix-cache-backend", "kvsqueeze-dms"))
# When chunked prefill is turned off, SGLang 0.5.23 derives a negative static memory fraction: an explicit
# one. On a GPU: the head pool is placed in Python before each forward, so no overlapped scheduling (the
# CPU turns it off anyway). Decode graphs (CUDA graphs; CPU graphs with --enable-torch-compile) are
# captured when asked for by any of GRAPH_FLAGS; off otherwise (docs/dms.md says why).
DMS_DEFAULTS = (("--mem-fraction-static", "0.8"), ("--disable-overlap-schedule", None),
                ("--disable-cuda-graph", None))
GRAPH_FLAGS = ("--enable-torch-compile", "--cuda-graph-bs-decode", "--cuda-graph-max-bs-decode")


class DMSSpec(ServingSpec):
    name = "dms"
    summary = "DMS: learned per-head eviction, K/V in a per-head pool where evicted tokens free slots"
    default_setting = "4"
    refused_flags = {
        "--enable-hierarchical-cache": "the hierarchical cache copies SGLang's token pool to the host; DMS "
        "keeps its K/V in its own per-head pool",
        "--enable-mixed-chunk": "DMS places prefill and decode tokens in separate forward passes",
    }

    def checkpoint(self, spec: MethodSpec) -> Path:
        from kvsqueeze.methods.dms.checkpoint import load_config
        from kvsqueeze.methods.dms.method import resolve_checkpoint

        opts = self.options(spec)
        d = resolve_checkpoint(opts.get("ratio"), opts.get("checkpoint"))
        load_config(d)  # a directory without DMS parameters fails here, before SGLang starts
        return d

    def resolve(self, spec):
        out = super().resolve(spec)
        self.checkpoint(out)
        return out

    def check(self, spec, ctx, args):
        from kvsqueeze.backends.sglang import dms as sg_dms
        from kvsqueeze.methods.dms.checkpoint import load_config

        super().check(spec, ctx, args)
        page = flag_value(args, "--page-size")
        if page not in (None, "1"):
            raise bad_value("page-size", page, "1 with DMS (SGLang's token indices; the per-head pool "
                            "allocates its own slots)")
        load_config(self.checkpoint(spec))  # a directory without DMS parameters fails here
        cfg_file = Path(ctx.model) / "config.json"
        arch = json.loads(cfg_file.read_text()).get("architectures", []) if cfg_file.is_file() else []
        if arch and not set(arch) <= set(sg_dms.MODELS):
            raise bad_value("architecture", ",".join(arch), f"one of {', '.join(sg_dms.MODELS)} with DMS in "
                            "SGLang (the model classes the gates are wired into)")
        for flag, value in DMS_FLAGS:
            given = flag_value(args, flag)
            if has_flag(args, flag) and given != value:
                raise bad_value(flag.lstrip("-"), given, f"{value} with DMS (the attention backend and the "
                                "radix cache that know the per-head pool)")

    def plan(self, spec, ctx, args):
        from kvsqueeze.backends.sglang import dms as sg_dms

        env = {sg_dms.ENV: str(self.checkpoint(spec))}
        flags = []
        graphs = [f for f in GRAPH_FLAGS if has_flag(args, f)]
        for flag, value in DMS_FLAGS + DMS_DEFAULTS:
            if has_flag(args, flag) or (flag == "--disable-cuda-graph" and graphs):
                continue
            flags += [flag] + ([value] if value is not None else [])
        notes = [f"DMS decode graphs captured ({', '.join(graphs)})"] if graphs else []
        return ServerPlan(flags, env, notes)


SPECS: dict[str, ServingSpec] = {s.name: s for s in (NoneSpec(), DMSSpec(), KVTCSpec(), FusionSpec())}
ALIASES = {"dense": "none", "vanilla": "none"}
# pairs that cannot share one server, and why
CONFLICTS = {
    frozenset({"dms", "kvtc"}): "the KVTC tier stores SGLang's radix-cache pages; DMS keeps its K/V in its "
                                "own per-head pool",
    frozenset({"dms", "fusion"}): "fusion shares whole pages of SGLang's token pool; DMS keeps its K/V in "
                                  "its own per-head pool",
}
DEFAULT_SERVERS = ("none", "dms:4", "dms:8")  # kvsqueeze bench's main job (the others: --methods)


@dataclass(frozen=True)
class ServerSpec:
    """What one server runs: one method, or several that compose (resolved: defaults filled in)."""

    methods: tuple[MethodSpec, ...]

    @property
    def label(self) -> str:
        return "+".join(m.label for m in self.methods)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods)

    def __str__(self) -> str:
        return self.label

    def summary(self) -> str:
        return " + ".join(SPECS[n].summary for n in self.names)


def parse_server(text: str) -> ServerSpec:
    """``"kvtc:8+fusion:0.9"`` -> the resolved :class:`ServerSpec`; unknown methods, bad settings and
    combinations that cannot work are refused here, before anything starts."""
    if not isinstance(text, str) or not text.strip():
        raise bad_value("method", text, "METHOD[:SETTING[:VARIANT]][+METHOD...], e.g. dms:4 or kvtc:8+fusion:0.9")
    out = []
    for part in text.split("+"):
        spec = parse_spec(part)
        name = ALIASES.get(spec.name, spec.name)
        if name not in SPECS:
            get(name)  # an unknown name fails here with the list of methods
            raise bad_value("method", spec.label, f"a method that runs in SGLang: one of {', '.join(SPECS)} "
                            f"({name} is evaluated with `kvsqueeze eval` only)")
        out.append(SPECS[name].resolve(MethodSpec(name, spec.setting, spec.variant)))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise bad_value("method", text, "each method once per server")
    if "none" in names and len(names) > 1:
        raise bad_value("method", text, "none alone (it is stock SGLang, without the other methods)")
    for pair, why in CONFLICTS.items():
        if pair <= set(names):
            a, b = sorted(pair)
            raise KvsqueezeError(f"method={text!r}: {a} and {b} cannot run in one server: {why}")
    return ServerSpec(tuple(out))


def parse_servers(text: str | None) -> list[ServerSpec]:
    """A comma-separated list of servers (``kvsqueeze bench --methods``); default: vanilla and DMS at
    4x and 8x (:data:`DEFAULT_SERVERS`), the methods that change what a question holds and reads."""
    parts = list(DEFAULT_SERVERS) if not text else [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise bad_value("methods", text, "a comma-separated list such as none,dms:4,kvtc:8")
    servers = [parse_server(p) for p in parts]
    labels = [s.label for s in servers]
    if len(set(labels)) != len(labels):
        raise bad_value("methods", text, "each server once")
    return servers


def plan_server(server: ServerSpec, ctx: ServeContext, args: list[str] | None = None) -> ServerPlan:
    """SGLang flags and environment for ``server``; ``args`` are the user's own SGLang flags (they win
    over the plan's defaults and come after them). Where the methods have a page size and the user
    gives none, the largest of their defaults serves all of them (the KVTC tier's 64 with fusion)."""
    args = list(args or [])
    plan = ServerPlan([] if has_flag(args, METRICS_FLAG) else [METRICS_FLAG])
    pages = [SPECS[n].default_page_size for n in server.names if SPECS[n].default_page_size]
    if pages and not has_flag(args, "--page-size"):
        plan.args += ["--page-size", str(max(pages))]
    for m in server.methods:  # every check before anything is loaded (a KVTC calibration takes minutes)
        SPECS[m.name].check(m, ctx, plan.args + args)
    for m in server.methods:
        part = SPECS[m.name].plan(m, ctx, plan.args + args)
        plan.args += part.args
        plan.env.update(part.env)
        plan.notes += part.notes
    return plan
