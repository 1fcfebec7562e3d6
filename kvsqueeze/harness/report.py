"""Turn load runs into tables, a markdown report and plots; compare several runs.

Inputs (what ``kvsqueeze bench`` writes under a run directory): ``run.json`` (what ran),
``configs.json`` (one entry per configuration: status, wall time, server figures) and
``configs/*/requests*.csv`` (one row per sample). Outputs in the same directory (or ``--out`` for a
comparison): ``samples.csv`` (all rows, with computed KV reads), ``summary.csv`` and ``summary.json``
(one row per configuration), ``report.md`` and ``plots/*.png``. Definitions: ``docs/metrics.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvsqueeze.errors import KvsqueezeError, bad_value
from kvsqueeze.harness.tasks import majority


def kv_reads_computed(prompt_tokens, output_tokens, layers: int, kv_heads: int):
    """KV token reads of a sample's decode steps on a dense cache, summed over layers and KV heads.

    The decode step that produces output token t (t = 2..T) attends to the P prompt tokens and the
    t-1 output tokens before it: sum_{t=2..T} (P + t - 1) = (T-1) P + T (T-1) / 2 token positions,
    times layers x KV heads. The first output token comes from prefill, whose reads are not counted.
    """
    P, T = int(prompt_tokens), int(output_tokens)
    if T < 2:
        return 0
    return layers * kv_heads * ((T - 1) * P + T * (T - 1) // 2)


def load_run(run_dir: Path):
    import pandas as pd

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise bad_value("run", str(run_dir), "a run directory written by kvsqueeze bench "
                        "(with run.json)")
    meta = json.loads((run_dir / "run.json").read_text())
    cfg_path = run_dir / "configs.json"
    configs = json.loads(cfg_path.read_text()) if cfg_path.is_file() else []
    text_cols = {"extracted": str, "answer": str, "text": str, "error": str, "qid": str}
    frames = [pd.read_csv(p, dtype=text_cols) for p in
              sorted((run_dir / "configs").glob("*/requests*.csv")) if p.stat().st_size > 0]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not df.empty:
        dims = meta.get("dims") or {}
        layers, heads = int(dims.get("layers", 0)), int(dims.get("kv_heads", 0))
        comp = [kv_reads_computed(p, t, layers, heads) if ok == 1 and p == p and t == t else None
                for p, t, ok in zip(df["prompt_tokens"], df["output_tokens"], df["ok"])]
        server = df["kv_token_reads_server"]
        df["kv_reads"] = [s if s == s and s is not None else c for s, c in zip(server, comp)]
        df["kv_reads_source"] = ["server" if s == s and s is not None else "computed"
                                 for s in server]
        df["run"] = meta.get("run", run_dir.name)
    return meta, configs, df


def _pct(series, q):
    s = series.dropna()
    return float(s.quantile(q)) if len(s) else float("nan")


def summarize(meta: dict, configs: list[dict], df):
    """One row per configuration (configurations that produced no rows still appear)."""
    import numpy as np
    import pandas as pd

    dims = meta.get("dims") or {}
    bytes_per_token = (2 * int(dims.get("layers", 0)) * int(dims.get("kv_heads", 0))
                       * int(dims.get("head_dim", 0)) * 2)
    rows = []
    for c in configs:
        sub = df[df["config"] == c["config"]] if not df.empty else df
        ok = sub[sub["ok"] == 1] if len(sub) else sub
        srv = c.get("server") or {}
        r = {"run": meta.get("run"), "config": c["config"], "method": c["method"], "W": c["W"],
             "L": c["L"], "mode": c["mode"], "endpoint": c["endpoint"], "status": c["status"],
             "samples": int(len(sub)), "failed": int(len(sub) - len(ok))}
        if len(sub):
            groups = sub.groupby("group")
            votes = [int(majority([a if isinstance(a, str) else None for a in g["extracted"]])
                         == str(g["answer"].iloc[0])) for _, g in groups]
            t_start = sub["start_unix"].min()
            t_end = (sub["start_unix"] + sub["e2e_s"].fillna(0)).max()
            span = max(float(t_end - t_start), 1e-9)
            n_req = groups.ngroups if c["mode"] == "n" else len(sub)
            reads = ok.groupby("group")["kv_reads"].sum(min_count=1)
            r.update({
                "questions": int(groups.ngroups),
                "accuracy": float(sub["correct"].mean()),
                "accuracy_majority": float(np.mean(votes)),
                "output_tokens": int(ok["output_tokens"].sum()),
                "output_tok_s": float(ok["output_tokens"].sum() / span),
                "req_s": float(n_req / span),
                "ttft_p50_s": _pct(ok["ttft_s"], .5), "ttft_p90_s": _pct(ok["ttft_s"], .9),
                "ttft_p99_s": _pct(ok["ttft_s"], .99),
                "tpot_p50_s": _pct(ok["tpot_s"], .5), "tpot_p90_s": _pct(ok["tpot_s"], .9),
                "e2e_p50_s": _pct(ok["e2e_s"], .5), "e2e_p90_s": _pct(ok["e2e_s"], .9),
                "e2e_p99_s": _pct(ok["e2e_s"], .99),
                "kv_reads_per_question": float(reads.mean()) if len(reads) else float("nan"),
                "kv_reads_source": ",".join(sorted(set(ok["kv_reads_source"]))) if len(ok) else "",
                "cached_tokens_mean": float(ok["cached_tokens"].mean()) if len(ok) else float("nan"),
            })
        # what the server holds: DMS's per-head pool (in dense-token equivalents), else SGLang's slots
        peak = srv.get("peak kvsqueeze_dms_held_tokens", srv.get("peak kvsqueeze_kv_tokens_held",
                                                                  srv.get("peak sglang:num_used_tokens")))
        r["peak_kv_tokens"] = float(peak) if peak is not None else float("nan")
        r["peak_kv_mib_16bit"] = (r["peak_kv_tokens"] * bytes_per_token / 2**20
                                  if bytes_per_token else float("nan"))
        r["peak_running_reqs"] = srv.get("peak sglang:num_running_reqs", float("nan"))
        before = srv.get("last kvsqueeze_kvtc_bytes_before")
        after = srv.get("last kvsqueeze_kvtc_bytes_after")
        r["store_pages"] = srv.get("last kvsqueeze_kvtc_pages_held", float("nan"))
        r["store_ratio"] = float(before / after) if before and after else float("nan")
        r["store_hits"] = srv.get("delta kvsqueeze_kvtc_hits", float("nan"))
        r["fused_pages"] = srv.get("delta kvsqueeze_fusion_pages_fused", float("nan"))
        r["fused_share"] = (r["fused_pages"] / srv["delta kvsqueeze_fusion_pages_checked"]
                            if srv.get("delta kvsqueeze_fusion_pages_checked") else float("nan"))
        r["wall_s"] = c.get("wall_s")
        r["reasons"] = "; ".join(c.get("reasons") or [])
        rows.append(r)
    return pd.DataFrame(rows)


def pareto(xs, ys, minimize_x: bool = True) -> list[int]:
    """Indices of the points no other point beats (higher y and better x), sorted by x."""
    pts = [(x, y, i) for i, (x, y) in enumerate(zip(xs, ys)) if x == x and y == y]
    front = []
    for x, y, i in pts:
        dominated = any((x2 <= x if minimize_x else x2 >= x) and y2 >= y and (x2, y2) != (x, y)
                        for x2, y2, _ in pts)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: xs[i])


def plot(summary, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    s = summary[summary["samples"] > 0].reset_index(drop=True) if len(summary) else summary
    paths = []
    if not len(s):
        return paths
    methods = list(dict.fromkeys(s["method"]))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    label_of = (lambda r: f"{r['run']}:{r['method']}") if s["run"].nunique() > 1 else \
        (lambda r: r["method"])
    for xcol, xlabel, fname, minimize, logx in (
            ("kv_reads_per_question", "KV token reads per question (decode, summed over layers "
             "and KV heads, W samples)", "accuracy_vs_kv_reads.png", True, True),
            ("peak_kv_tokens", "peak KV tokens held by the server", "accuracy_vs_peak_kv.png",
             True, False),
            ("output_tok_s", "output tokens/s (all samples)", "accuracy_vs_throughput.png",
             False, False)):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        seen = set()
        for _, r in s.iterrows():
            lab = label_of(r)
            ax.scatter(r[xcol], r["accuracy_majority"], color=colors[r["method"]], s=50,
                       marker="o" if r["mode"] == "n" else "s",
                       label=None if lab in seen else lab, zorder=3)
            seen.add(lab)
            ax.annotate(f"W{r['W']} L{r['L']}", (r[xcol], r["accuracy_majority"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        for key in dict.fromkeys(s["method"]):  # one frontier per method, in its colour
            idx = [i for i in range(len(s)) if s["method"][i] == key]
            sub_front = [idx[j] for j in pareto([s[xcol][i] for i in idx],
                                                [s["accuracy_majority"][i] for i in idx],
                                                minimize_x=minimize)]
            ax.plot([s[xcol][i] for i in sub_front], [s["accuracy_majority"][i] for i in sub_front],
                    "--", color=colors[key], lw=1.2, zorder=2)
        front = pareto(list(s[xcol]), list(s["accuracy_majority"]), minimize_x=minimize)
        ax.scatter([s[xcol][i] for i in front], [s["accuracy_majority"][i] for i in front], s=160,
                   facecolors="none", edgecolors="k", lw=1.2, zorder=4,
                   label="Pareto-optimal over all (dashed: per method)")
        if s["mode"].nunique() > 1:
            ax.scatter([], [], color="gray", marker="o", label="mode n (one request, n=W)")
            ax.scatter([], [], color="gray", marker="s", label="mode concurrent (W requests)")
        if logx and (s[xcol] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (majority vote over W samples)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(fname[:-4].replace("_", " "))
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        paths.append(out_dir / fname)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(s) + 4), 5))
    x = range(len(s))
    names = [f"{label_of(r)} W{r['W']} L{r['L']}" + ("" if r["mode"] == "n" else " conc")
             for _, r in s.iterrows()]
    for ax, metric, title in ((axes[0], "ttft", "time to first token"),
                              (axes[1], "e2e", "end-to-end latency")):
        qs = ("p50", "p90", "p99")
        width = 0.8 / len(qs)
        for j, q in enumerate(qs):
            ax.bar([i + j * width for i in x], s[f"{metric}_{q}_s"], width, label=q)
        ax.set_xticks([i + width for i in x])
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("seconds")
        ax.set_title(title + " per configuration")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_percentiles.png", dpi=110)
    plt.close(fig)
    paths.append(out_dir / "latency_percentiles.png")
    return paths


_COLUMNS = [("method", "method", "{}"), ("W", "W", "{}"), ("L", "L", "{}"), ("mode", "mode", "{}"),
            ("status", "status", "{}"), ("questions", "questions", "{:.0f}"),
            ("failed", "failed", "{:.0f}"), ("accuracy", "acc/sample", "{:.2f}"),
            ("accuracy_majority", "acc/majority", "{:.2f}"),
            ("output_tok_s", "out tok/s", "{:.1f}"), ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
            ("ttft_p99_s", "TTFT p99 s", "{:.3f}"), ("tpot_p50_s", "TPOT p50 s", "{:.3f}"),
            ("e2e_p50_s", "E2E p50 s", "{:.2f}"), ("e2e_p99_s", "E2E p99 s", "{:.2f}"),
            ("kv_reads_per_question", "KV reads/question", "{:.3g}"),
            ("peak_kv_tokens", "peak KV tokens", "{:.0f}"),
            ("cached_tokens_mean", "cached tok", "{:.0f}"),
            ("store_ratio", "store ratio", "{:.2f}"), ("store_hits", "store hits", "{:.0f}"),
            ("fused_pages", "fused pages", "{:.0f}"), ("fused_share", "fused share", "{:.2f}")]


def markdown_table(summary) -> str:
    cols = [c for c in _COLUMNS if c[0] in summary.columns]
    if len(summary) and "run" in summary and summary["run"].nunique() > 1:
        cols = [("run", "run", "{}")] + cols
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "---|" * len(cols)]
    for _, r in summary.iterrows():
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if v is None or (isinstance(v, float) and v != v):
                cells.append("–")
            else:
                cells.append(fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(metas: list[dict], summary, out_dir: Path, plots: list[Path]) -> Path:
    incomplete = summary[summary["status"] != "complete"] if len(summary) else summary
    parts = [f"# Load report: {', '.join(m.get('run', '?') for m in metas)}", ""]
    for m in metas:
        parts += [f"- run `{m.get('run')}`: status **{m.get('status')}**, model `{m.get('model')}`, "
                  f"methods {', '.join(m.get('methods', []))}, grid {json.dumps(m.get('grid'))}, "
                  f"tasks {', '.join(m.get('tasks', []))} x {m.get('questions_per_task')} "
                  f"questions, {m.get('users')} Locust users, temperature {m.get('temperature')}, "
                  f"started {m.get('started')}, {m.get('wall_s', '?')} s"
                  + (f", KVTC calibration `{m['calibration']}`" if m.get("calibration") else "")
                  + (f"; command `{m['command']}`" if m.get("command") else "")]
    parts += ["", "## Configurations", "", markdown_table(summary), ""]
    if len(incomplete):
        parts += ["## Incomplete configurations", ""]
        parts += [f"- `{r['config']}`: {r['reasons'] or r['status']}" for _, r in
                  incomplete.iterrows()]
        parts.append("")
    notes = {
        "kvtc": "`kvtc:R`: KVTC compresses the pages SGLang's hierarchical cache writes to its "
                "storage tier (host memory or a directory) and restores them on a prefix hit; the "
                "device KV cache stays uncompressed, so decode reads and peak device KV tokens are "
                "not reduced by it (its page size of 64 also rounds each sequence's slots up). "
                "What it saves is the storage tier's bytes (store ratio), and what it can save in "
                "time is prefill of a restored prefix (cached tokens, TTFT).",
        "none": "`none`: stock SGLang (radix prefix cache; page size 1 unless the run's SGLang "
                "arguments set one).",
        "dms": "`dms:R`: DMS with the shipped R-x gates (or `dms:DIR`, a checkpoint): evicted tokens leave "
               "a per-head page pool, so KV reads are the server's own count of the tokens each decode "
               "step attends and peak KV tokens the pool's peak holdings (dense-token equivalents); the "
               "radix cache is off for it.",
        "fusion": "`fusion:T[:token]`: new full pages that are near-duplicates (similarity >= T, "
                  "block or per-token key cosine) of a page already held at the same position "
                  "become one shared page of SGLang's pool; the freed pages are free for other "
                  "requests (docs/fusion.md). Fused pages: pages fused during the configuration; "
                  "fused share: of the new full pages compared.",
    }
    methods = {p.split(":")[0] for m in summary["method"] for p in str(m).split("+")} if len(summary) else set()
    if methods & notes.keys():
        parts += ["## Methods", ""] + [f"- {notes[m]}" for m in sorted(methods) if m in notes] + [""]
    parts += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    parts += ["## How to read it", "",
              "acc/sample: share of samples whose first number equals the answer; acc/majority: "
              "share of questions whose majority answer over the W samples is right. TTFT, TPOT "
              "and E2E are per sample (docs/metrics.md). KV reads/question: decode-step KV token "
              "reads of the W samples of a question, summed over layers and KV heads; `computed` "
              "from prompt and output lengths for a dense cache where the server does not report "
              "them. Peak KV tokens: the largest `sglang:num_used_tokens` seen while polling "
              "`/metrics` every 0.5 s (radix-cached tokens included). Store ratio: 16-bit bytes "
              "over stored bytes of the pages in the KVTC storage tier after the configuration's "
              "flush; store hits: pages restored from it during the configuration. The device "
              "cache is flushed before each configuration, so a prompt seen in an earlier "
              "configuration is restored from the storage tier (kvtc) or recomputed (none).", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def build_many(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    import pandas as pd

    if not run_dirs:
        raise KvsqueezeError("report: expected at least one run directory")
    metas, summaries, samples = [], [], []
    for d in run_dirs:
        meta, configs, df = load_run(Path(d))
        metas.append(meta)
        summaries.append(summarize(meta, configs, df))
        samples.append(df)
    out_dir = Path(out_dir or run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = pd.concat(summaries, ignore_index=True)
    allrows = pd.concat([s for s in samples if not s.empty], ignore_index=True) \
        if any(not s.empty for s in samples) else pd.DataFrame()
    allrows.to_csv(out_dir / "samples.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    (out_dir / "summary.json").write_text(summary.to_json(orient="records", indent=1))
    plots = plot(summary, out_dir / "plots")
    return write_report(metas, summary, out_dir, plots)


def build(run_dir: Path) -> Path:
    return build_many([Path(run_dir)], Path(run_dir))
