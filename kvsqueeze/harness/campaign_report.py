"""A campaign folder's report: ``summary.csv`` (one row per point), ``capacity.csv`` (per workload
and method), ``report.md`` and ``plots/*.png``. Rebuilt from the folder alone (``kvsqueeze report``),
figures recomputed from the rows by :mod:`kvsqueeze.harness.measure` (so a rebuilt report follows the
current definitions).

The headline is the capacity at the SLO per method: the highest load whose attainment met the
target, below the lowest that failed (:func:`kvsqueeze.harness.capacity.bracket`), at the same KV
budget, and its ratio to vanilla (``none``). The interval of a capacity is its bracket
``[capacity, lowest failing load]`` (the threshold lies between them); the ratio's interval divides
the brackets: ``[cap / fail_none, fail / cap_none]``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from kvsqueeze.errors import bad_value
from kvsqueeze.harness import measure
from kvsqueeze.harness.capacity import bracket
from kvsqueeze.harness.slo import SLO
from kvsqueeze.harness.traffic import read_rows

BASELINE = "none"
PLOTS = ("latency_vs_load.png", "goodput_vs_load.png", "kv_held_over_time.png", "ttft_returning.png")


def is_campaign(folder: Path) -> bool:
    return (Path(folder) / "campaign.json").is_file()


def load(folder: Path) -> tuple[dict, list[dict]]:
    folder = Path(folder)
    if not is_campaign(folder):
        raise bad_value("run", str(folder), "a campaign folder written by kvsqueeze campaign (with campaign.json)")
    meta = json.loads((folder / "campaign.json").read_text())
    pts = folder / "points.json"
    return meta, (json.loads(pts.read_text()) if pts.is_file() else [])


def _series(point_dir: Path) -> list:
    p = point_dir / "series.json"
    return json.loads(p.read_text()) if p.is_file() else []


def summarize(folder: Path) -> tuple[dict, list[dict], list[dict]]:
    """(meta, one dict per point with its figures recomputed from its rows, capacity rows)."""
    from kvsqueeze.harness.servers import slug

    folder = Path(folder)
    meta, points = load(folder)
    slo = SLO.from_dict(meta["slo"]) if meta.get("slo") else None
    out = []
    for p in points:
        d = folder / "points" / slug(p["point"])
        row = {k: p.get(k) for k in ("point", "method", "workload", "load", "value", "status")}
        row["reasons"] = "; ".join(p.get("reasons") or [])
        row["campaign"] = meta.get("campaign", folder.name)
        row["dir"] = str(d)
        if d.is_dir():
            rows = read_rows(d)
            fig = measure.point_figures(rows, slo)
            fig.update(measure.kv_figures(_series(d), meta.get("kv_bytes_per_token", 0), fig["requests"]))
            fig.update(measure.server_figures(p.get("server") or {}))
        else:
            fig = dict(p.get("figures") or {})
        row.update(fig)
        out.append(row)
    return meta, out, capacity_rows(meta, out, slo)


def capacity_rows(meta: dict, rows: list[dict], slo: SLO | None) -> list[dict]:
    if slo is None:
        return []
    cap = []
    keys = list(dict.fromkeys((r["workload"], r["method"]) for r in rows if r.get("workload")))
    for w, m in keys:
        mine = [r for r in rows if r["workload"] == w and r["method"] == m]
        passed = [(float(r["value"]), r["status"] == "complete" and bool(r.get("meets_target"))) for r in mine]
        c, fail = bracket(passed)
        at = next((r for r in mine if c is not None and float(r["value"]) == c), {})
        cap.append({"workload": w, "method": m, "capacity": c, "lowest_failing": fail, "points": len(mine),
                    "attainment_at_capacity": at.get("attainment"), "attainment_lo": at.get("attainment_lo"),
                    "attainment_hi": at.get("attainment_hi"), "goodput_at_capacity": at.get("goodput_rps"),
                    "kv_held_peak_mib": (at.get("kv_held_peak_bytes") or float("nan")) / 2**20,
                    "ttft_p50_s": at.get("ttft_s_p50"), "tpot_p50_s": at.get("tpot_s_p50")})
    for r in cap:
        name = BASELINE + r["method"][r["method"].index("@"):] if "@" in r["method"] else BASELINE
        base = next((b for b in cap if b["workload"] == r["workload"] and b["method"] == name), None)
        r["ratio"], r["ratio_lo"], r["ratio_hi"] = _ratio(r, base)
    return cap


def _ratio(r: dict, base: dict | None) -> tuple[float, float, float]:
    nan = float("nan")
    if base is r:
        return 1.0, nan, nan  # the baseline itself
    if not base or not r["capacity"] or not base["capacity"]:
        return nan, nan, nan
    ratio = r["capacity"] / base["capacity"]
    lo = r["capacity"] / base["lowest_failing"] if base["lowest_failing"] else nan
    hi = r["lowest_failing"] / base["capacity"] if r["lowest_failing"] else math.inf
    return ratio, lo, hi


def _fmt(v, spec=".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def write_report(folder: Path, meta: dict, rows: list[dict], cap: list[dict]) -> Path:
    folder = Path(folder)
    unit = "requests/s" if meta.get("load", {}).get("kind") != "closed" else "concurrent clients"
    ident = meta.get("identity") or {}
    lines = [f"# Campaign {meta.get('campaign', folder.name)}", "",
             f"Model `{meta.get('model')}`; KV budget {ident.get('budget_tokens') or 'the server default'} tokens "
             f"per server ({_fmt(meta.get('kv_bytes_per_token', 0) / 1024, '.0f')} KiB per token at "
             f"{meta.get('server_dtype')}); load {ident.get('load')}; endpoint `{ident.get('endpoint')}`; "
             f"workloads {', '.join(f'`{w}`' for w in ident.get('workloads', []))}; "
             + (f"{ident['duration_s']:g} s per point" if ident.get("duration_s") else f"{ident.get('requests')} "
                "conversations per point") + f", warm-up {ident.get('warmup')}; seed {ident.get('seed')}.",
             f"Status: {meta.get('status')}; wall time {_fmt(meta.get('wall_s', 0) / 60, '.1f')} min.",
             f"Command: `{meta.get('command', '')}`", ""]
    if cap:
        lines += [f"## Capacity at the SLO ({meta['slo']['label']})", "",
                  f"The highest load ({unit}) whose requests met every bound at least {meta['slo']['target']:.0%} of "
                  "the time, at the same KV budget; [capacity, lowest failing load] brackets the threshold; the "
                  f"ratio is to `{BASELINE}` with the brackets divided.", "",
                  "| workload | method | capacity | lowest failing | ratio to none | attainment there [95%] "
                  "| goodput req/s | TTFT p50 s | TPOT p50 s | peak KV MiB | points |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in cap:
            ratio = ("1 (baseline)" if r["method"].split("@")[0] == BASELINE else
                     f"{_fmt(r['ratio'])} [{_fmt(r['ratio_lo'])}, {_fmt(r['ratio_hi'])}]")
            lines.append(f"| {r['workload']} | {r['method']} | {_fmt(r['capacity'], 'g')} | "
                         f"{_fmt(r['lowest_failing'], 'g')} | {ratio} | {_fmt(r['attainment_at_capacity'])} [{_fmt(r['attainment_lo'])}, "
                         f"{_fmt(r['attainment_hi'])}] | {_fmt(r['goodput_at_capacity'])} | {_fmt(r['ttft_p50_s'])} | "
                         f"{_fmt(r['tpot_p50_s'], '.3f')} | {_fmt(r['kv_held_peak_mib'], '.1f')} | {r['points']} |")
        lines.append("")
    lines += ["## Points", "",
              "| method | workload | load | sent | failed | req/s | out tok/s | TTFT p50 / p99 s | TPOT p50 / p99 s "
              "| ITL p50 s | E2E p50 s | lag p99 ms | attainment [95%] | goodput | prefix hits/req dev / host / "
              "storage | peak KV MiB | KV MiB·s/req | retractions | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        att = (f"{_fmt(r.get('attainment'))} [{_fmt(r.get('attainment_lo'))}, {_fmt(r.get('attainment_hi'))}]"
               if "attainment" in r else "-")
        lines.append(
            f"| {r['method']} | {r.get('workload') or '-'} | {r.get('load')} {_fmt(r.get('value'), 'g')} | "
            f"{r.get('requests', '-')} | {r.get('failed', '-')} | {_fmt(r.get('requests_per_s'))} | "
            f"{_fmt(r.get('output_tok_s'), '.1f')} | {_fmt(r.get('ttft_s_p50'))} / {_fmt(r.get('ttft_s_p99'))} | "
            f"{_fmt(r.get('tpot_s_p50'), '.3f')} / {_fmt(r.get('tpot_s_p99'), '.3f')} | {_fmt(r.get('itl_s_p50'), '.3f')} | "
            f"{_fmt(r.get('e2e_s_p50'))} | {_fmt((r.get('lag_p99_s') or float('nan')) * 1000, '.1f')} | {att} | "
            f"{_fmt(r.get('goodput_rps'))} | {_fmt(r.get('cached_device_per_request'), '.0f')} / "
            f"{_fmt(r.get('cached_host_per_request'), '.0f')} / {_fmt(r.get('cached_storage_per_request'), '.0f')} | "
            f"{_fmt((r.get('kv_held_peak_bytes') or float('nan')) / 2**20, '.1f')} | "
            f"{_fmt((r.get('kv_byte_s_per_request') or float('nan')) / 2**20, '.1f')} | {_fmt(r.get('retractions'), '.0f')} "
            f"| {r['status']} |")
    def given(v):
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    tiers = [r for r in rows if any(given(r.get(k)) for k in ("store_pages_written", "store_hits", "fused_pages"))]
    if tiers:
        lines += ["", "### Storage tier and fusion (server counters over each point)", "",
                  "| method | workload | load | KVTC pages written | store hits | misses | restore s | encode s | "
                  "fused pages | of pages checked |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in tiers:
            lines.append(f"| {r['method']} | {r.get('workload')} | {r.get('load')} {_fmt(r.get('value'), 'g')} | "
                         f"{_fmt(r.get('store_pages_written'), '.0f')} | {_fmt(r.get('store_hits'), '.0f')} | "
                         f"{_fmt(r.get('store_misses'), '.0f')} | {_fmt(r.get('store_restore_s'), '.1f')} | "
                         f"{_fmt(r.get('store_encode_s'), '.1f')} | {_fmt(r.get('fused_pages'), '.0f')} | "
                         f"{_fmt(r.get('fusion_pages_checked'), '.0f')} |")
    bad = [r for r in rows if r["status"] != "complete"]
    if bad:
        lines += ["", "## Incomplete points", ""] + [f"- `{r['point']}`: {r['reasons']}" for r in bad]
    lines += ["", "Plots: " + ", ".join(f"[{p}](plots/{p})" for p in PLOTS if (folder / "plots" / p).is_file()),
              "", "Definitions: docs/metrics.md (campaign figures) and docs/harness.md (how points run)."]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot(folder: Path, meta: dict, rows: list[dict], cap: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    out_dir = folder / "plots"
    out_dir.mkdir(exist_ok=True)
    made = []
    workloads = list(dict.fromkeys(r.get("workload") for r in rows if r.get("workload")))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    closed = meta.get("load", {}).get("kind") == "closed"
    xlabel = "concurrent clients" if closed else "offered load (requests/s)"
    slo = meta.get("slo") or {}
    bounds = slo.get("bounds_s", {})

    def series_of(w, m):
        pts = sorted((r for r in rows if r.get("workload") == w and r["method"] == m and r.get("requests")),
                     key=lambda r: float(r["value"]))
        return pts, [float(r["value"]) for r in pts]

    if workloads:  # latency against load
        fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 3.6 * len(workloads)), squeeze=False)
        for i, w in enumerate(workloads):
            for j, (metric, name) in enumerate((("ttft_s", "TTFT"), ("tpot_s", "TPOT"))):
                ax = axes[i][j]
                for m in methods:
                    pts, xs = series_of(w, m)
                    if not pts:
                        continue
                    ax.plot(xs, [r.get(f"{metric}_p50") for r in pts], "o-", color=colors[m], label=f"{m} p50")
                    ax.plot(xs, [r.get(f"{metric}_p99") for r in pts], "s--", color=colors[m], alpha=0.6,
                            label=f"{m} p99")
                if metric.split("_")[0] in bounds:
                    ax.axhline(bounds[metric.split("_")[0]], color="k", lw=0.8, ls=":", label="SLO bound")
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"{name} (s)")
                ax.set_title(f"{w}: {name}", fontsize=9)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(out_dir / PLOTS[0])
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 3.6 * len(workloads)), squeeze=False)
        for i, w in enumerate(workloads):
            for m in methods:
                pts, xs = series_of(w, m)
                if not pts:
                    continue
                axes[i][0].plot(xs, [r.get("requests_per_s") for r in pts], "o-", color=colors[m],
                                label=f"{m} completed")
                if slo:
                    axes[i][0].plot(xs, [r.get("goodput_rps") for r in pts], "s--", color=colors[m], alpha=0.7,
                                    label=f"{m} goodput")
                    att = [r.get("attainment") for r in pts]
                    # Wilson's bounds at 0 or 1 can sit a rounding error inside the estimate
                    lo = [max(0.0, a - r.get("attainment_lo", a)) for a, r in zip(att, pts)]
                    hi = [max(0.0, r.get("attainment_hi", a) - a) for a, r in zip(att, pts)]
                    axes[i][1].errorbar(xs, att, yerr=[lo, hi], fmt="o-", color=colors[m], capsize=3, label=m)
            if not closed:
                top = max((float(r["value"]) for r in rows if r.get("workload") == w), default=1)
                axes[i][0].plot([0, top], [0, top], color="grey", lw=0.8, ls=":", label="offered")
            axes[i][0].set_xlabel(xlabel)
            axes[i][0].set_ylabel("requests/s")
            axes[i][0].set_title(f"{w}: throughput and goodput", fontsize=9)
            axes[i][0].legend(fontsize=7)
            axes[i][0].grid(alpha=0.3)
            if slo:
                axes[i][1].axhline(slo["target"], color="k", lw=0.8, ls=":", label="target")
            axes[i][1].set_xlabel(xlabel)
            axes[i][1].set_ylabel("SLO attainment [95%]")
            axes[i][1].set_ylim(-0.02, 1.02)
            axes[i][1].set_title(f"{w}: attainment ({slo.get('label', 'no SLO')})", fontsize=9)
            axes[i][1].legend(fontsize=7)
            axes[i][1].grid(alpha=0.3)
        fig.tight_layout()
        made.append(out_dir / PLOTS[1])
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)

    # KV held over time and returning-turn TTFT at each method's capacity point (else its highest load)
    chosen = {}
    for w in workloads:
        for m in methods:
            pts, _ = series_of(w, m)
            c = next((r["capacity"] for r in cap if r["workload"] == w and r["method"] == m), None)
            at = [r for r in pts if c is not None and float(r["value"]) == c] or pts[-1:]
            if at:
                chosen[(w, m)] = at[0]
    if chosen:
        fig, axes = plt.subplots(len(workloads), 1, figsize=(9, 3.2 * len(workloads)), squeeze=False)
        for i, w in enumerate(workloads):
            ax = axes[i][0]
            for m in methods:
                r = chosen.get((w, m))
                if not r:
                    continue
                s = _series(Path(r["dir"]))
                pts = [(t, measure.running_tokens(v)) for t, v in s]
                pts = [(t, h) for t, h in pts if h is not None]
                if pts:
                    t0 = pts[0][0]
                    ax.plot([t - t0 for t, _ in pts], [h * meta.get("kv_bytes_per_token", 0) / 2**20 for _, h in pts],
                            color=colors[m], label=f"{m} at {float(r['value']):g}")
            ax.set_xlabel("seconds into the point")
            ax.set_ylabel("KV held by running requests (MiB)")
            ax.set_title(f"{w}: KV held over time (each method at its capacity, else its highest load)", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        made.append(out_dir / PLOTS[2])
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)

        multi = [w for w in workloads if any(r.get("returning_requests") for r in rows if r.get("workload") == w)]
        if multi:
            fig, axes = plt.subplots(len(multi), 1, figsize=(9, 3.2 * len(multi)), squeeze=False)
            for i, w in enumerate(multi):
                ax = axes[i][0]
                for m in methods:
                    r = chosen.get((w, m))
                    if not r:
                        continue
                    rs = [x for x in measure.measured(read_rows(Path(r["dir"])))
                          if int(x.get("ok") or 0) and x.get("ttft_s")]
                    for first, style in ((False, "-"), (True, ":")):
                        v = sorted(float(x["ttft_s"]) for x in rs if (int(x["turn"]) == 0) == first)
                        if v:
                            ax.step(v, [(k + 1) / len(v) for k in range(len(v))], style, color=colors[m], where="post",
                                    label=f"{m} {'first turns' if first else 'returning turns'} at {float(r['value']):g}")
                ax.set_xscale("log")
                ax.set_xlabel("TTFT (s)")
                ax.set_ylabel("share of requests")
                ax.set_title(f"{w}: TTFT of returning turns (solid) and first turns (dotted)", fontsize=9)
                ax.legend(fontsize=7)
                ax.grid(alpha=0.3)
            fig.tight_layout()
            made.append(out_dir / PLOTS[3])
            fig.savefig(made[-1], dpi=110)
            plt.close(fig)
    return made


def _write_all(folder: Path, meta: dict, rows: list[dict], cap: list[dict]) -> Path:
    _write_csv(folder / "summary.csv", rows)
    _write_csv(folder / "capacity.csv", cap)
    (folder / "summary.json").write_text(json.dumps({"points": rows, "capacity": cap}, indent=1, default=str))
    plot(folder, meta, rows, cap)
    return write_report(folder, meta, rows, cap)


def build(folder: Path) -> Path:
    folder = Path(folder)
    meta, rows, cap = summarize(folder)
    return _write_all(folder, meta, rows, cap)


def build_many(folders: list[Path], out: Path) -> Path:
    """Several campaigns in one report (``kvsqueeze report C1 C2 --out DIR``): each method is named
    ``method@campaign``, so one table and one set of plots compares them; the SLO and load of the first
    campaign head the report (campaigns under different SLOs are refused)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metas, rows = [], []
    for f in folders:
        meta, r, _ = summarize(Path(f))
        metas.append(meta)
        for x in r:
            x["method"] = f"{x['method']}@{meta.get('campaign', Path(f).name)}"
        rows += r
    slos = {json.dumps(m.get("slo"), sort_keys=True) for m in metas}
    if len(slos) > 1:
        raise bad_value("runs", ", ".join(str(f) for f in folders), "campaigns under one SLO (their SLOs differ)")
    meta = dict(metas[0], campaign=f"comparison of {', '.join(m.get('campaign', '?') for m in metas)}",
                status=", ".join(m.get("status", "?") for m in metas), wall_s=sum(m.get("wall_s", 0) for m in metas),
                command=" ; ".join(m.get("command", "") for m in metas))
    slo = SLO.from_dict(meta["slo"]) if meta.get("slo") else None
    return _write_all(out, meta, rows, capacity_rows(meta, rows, slo))
