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
from kvsqueeze.harness.axes import kv_reads_computed, question_peak_tokens  # noqa: F401
from kvsqueeze.harness.scrape import held_tokens
from kvsqueeze.harness.stats import majority

THROUGHPUT_ONLY = ("verify", "fill")  # phases of waves that re-ask answered questions


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


def _question_outcomes(sub, dims, mode: str):
    """Per question of one configuration: its scored outcome and its peak KV tokens."""
    from kvsqueeze.harness.stats import score_question

    outcomes, peaks = {}, {}
    for _, g in sub.groupby("qid"):
        qid = str(g["qid"].iloc[0])
        extracted = [a if isinstance(a, str) else None for a in g["extracted"]]
        outcomes[qid] = score_question(qid, extracted, str(g["answer"].iloc[0]))
        if (g["ok"] == 1).all():
            recs = g[["prompt_tokens", "output_tokens"] + [c for c in ("kv_held_peak_server", "kv_shared_server")
                                                           if c in g]].to_dict("records")
            peaks[qid] = question_peak_tokens(recs, int(dims.get("layers", 0)), int(dims.get("kv_heads", 0)),
                                              mode == "n")
    return outcomes, peaks


def summarize(meta: dict, configs: list[dict], df, outcomes_out: dict | None = None):
    """One row per configuration (configurations that produced no rows still appear); where
    ``outcomes_out`` is given, it receives config -> {qid: QuestionOutcome} (what paired comparisons read)."""
    import numpy as np
    import pandas as pd

    from kvsqueeze.harness import axes
    from kvsqueeze.harness.stats import accuracy

    dims = meta.get("dims") or {}
    bytes_per_token = (2 * int(dims.get("layers", 0)) * int(dims.get("kv_heads", 0))
                       * int(dims.get("head_dim", 0)) * 2)
    bw = [b["bytes_s"] for b in meta.get("bandwidth") or [] if b.get("bytes_s")]
    bandwidth = float(np.median(bw)) if bw else None
    rows = []
    for c in configs:
        rows_c = df[df["config"] == c["config"]] if not df.empty else df
        phase = rows_c["phase"].fillna("").astype(str) if "phase" in rows_c else None
        # answers: the pilot's and the batch's; the waves that filled the batch or verified a smaller
        # one after a retraction ran questions the batch phase had answered, for throughput only
        sub = rows_c[~phase.str.startswith(THROUGHPUT_ONLY)] if phase is not None else rows_c
        ok = sub[sub["ok"] == 1] if len(sub) else sub
        srv = c.get("server") or {}
        mb = c.get("max_batch") or {}
        r = {"run": meta.get("run"), "config": c["config"], "method": c["method"], "W": c["W"],
             "L": c["L"], "mode": c["mode"], "endpoint": c["endpoint"], "status": c["status"],
             "samples": int(len(sub)), "failed": int(len(sub) - len(ok))}
        if len(sub):
            groups = sub.groupby("group")
            outcomes, peaks = _question_outcomes(sub, dims, c["mode"])
            if outcomes_out is not None:
                outcomes_out[c["config"]] = outcomes
            acc = accuracy(list(outcomes.values()))
            tp = mb.get("throughput_phase", "batch")
            batch = rows_c[(phase == tp) & (rows_c["ok"] == 1)] if phase is not None and (phase == tp).any() else ok
            t_start = batch["start_unix"].min()
            t_end = (batch["start_unix"] + batch["e2e_s"].fillna(0)).max()
            span = max(float(t_end - t_start), 1e-9)
            n_req = batch["group"].nunique() if c["mode"] == "n" else len(batch)
            reads = ok.groupby("group")["kv_reads"].sum(min_count=1)
            peak_q = [v for v in peaks.values() if v]
            r.update(acc.as_dict())
            r.update({
                "output_tokens": int(ok["output_tokens"].sum()),
                "output_tok_s": float(batch["output_tokens"].sum() / span),
                "req_s": float(n_req / span),
                "ttft_p50_s": _pct(ok["ttft_s"], .5), "ttft_p90_s": _pct(ok["ttft_s"], .9),
                "ttft_p99_s": _pct(ok["ttft_s"], .99),
                "tpot_p50_s": _pct(ok["tpot_s"], .5), "tpot_p90_s": _pct(ok["tpot_s"], .9),
                "e2e_p50_s": _pct(ok["e2e_s"], .5), "e2e_p90_s": _pct(ok["e2e_s"], .9),
                "e2e_p99_s": _pct(ok["e2e_s"], .99),
                "kv_reads_per_question": float(reads.mean()) if len(reads) else float("nan"),
                "kv_reads_source": ",".join(sorted(set(ok["kv_reads_source"]))) if len(ok) else "",
                "cached_tokens_mean": float(ok["cached_tokens"].mean()) if len(ok) else float("nan"),
                "peak_kv_per_question": float(np.mean(peak_q)) if peak_q else float("nan"),
                "peak_kv_per_question_max": float(np.max(peak_q)) if peak_q else float("nan"),
                "batch_tpot_p50_s": _pct(batch["tpot_s"], .5),
            })
            used = mb.get("used")
            r["max_batch"] = used if used else float("nan")
            r["max_batch_predicted"] = mb.get("predicted", float("nan"))
            r["max_batch_capped"] = bool(mb.get("capped_by_questions")) if used else None
            r["retractions"] = mb.get("retractions", float("nan"))
            r["max_batch_verified"] = mb.get("verified")
            r["max_batch_filled"] = bool(mb.get("filled"))
            tpot = r["batch_tpot_p50_s"]
            r["decode_tok_s"] = used * c["W"] / tpot if used and tpot and tpot == tpot else float("nan")
            if bandwidth and used and peak_q and meta.get("weight_bytes"):
                bound = axes.decode_bound_tok_s(bandwidth, meta["weight_bytes"], meta.get("kv_bytes_per_token", 0),
                                                used, c["W"], float(np.mean(peak_q)))
                r["bound_tok_s"] = bound
                r["pct_of_bound"] = 100 * r["decode_tok_s"] / bound if r["decode_tok_s"] == r["decode_tok_s"] \
                    else float("nan")
        # what the server holds: DMS's per-head pool (in dense-token equivalents), else SGLang's slots
        peaks_srv = [held_tokens({k.removeprefix("peak "): x for k, x in v.items() if k.startswith("peak ")})
                     for v in (srv, c.get("pilot_server") or {})]
        peaks_srv = [v for v in peaks_srv if v is not None]
        peak = max(peaks_srv) if peaks_srv else None
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


def paired_rows(summary, outcomes: dict, baseline: str = "none") -> list[dict]:
    """Each method against ``baseline`` at the same (W, L, mode, endpoint), on the questions both ran."""
    from kvsqueeze.harness.stats import paired

    out = []
    if not len(summary):
        return out
    base = summary[summary["method"] == baseline]
    for _, r in summary[summary["method"] != baseline].iterrows():
        b = base[(base["W"] == r["W"]) & (base["L"] == r["L"]) & (base["mode"] == r["mode"])
                 & (base["endpoint"] == r["endpoint"])]
        if b.empty or r["config"] not in outcomes or b["config"].iloc[0] not in outcomes:
            continue
        a_o, b_o = outcomes[r["config"]], outcomes[b["config"].iloc[0]]
        maj = paired({q: o.majority for q, o in a_o.items()}, {q: o.majority for q, o in b_o.items()})
        per = paired({q: o.per_sample for q, o in a_o.items()}, {q: o.per_sample for q, o in b_o.items()})
        out.append({"method": r["method"], "baseline": baseline, "W": r["W"], "L": r["L"], "mode": r["mode"],
                    "questions": maj.questions, "d_majority": maj.diff, "d_majority_lo": maj.ci[0],
                    "d_majority_hi": maj.ci[1], "wins": maj.wins, "losses": maj.losses,
                    "d_per_sample": per.diff, "d_per_sample_lo": per.ci[0], "d_per_sample_hi": per.ci[1]})
    return out


AXES = (("kv_reads_per_question", "KV-cache token reads per question", True, True),
        ("peak_kv_per_question", "peak KV tokens in memory per question", True, True),
        ("output_tok_s", "output tokens/s at the maximum batch", False, False))


def frontier_verdicts(summary, baseline: str = "none") -> list[str]:
    """Where each method's Pareto frontier (maj@W against each axis) lies above the baseline's by more
    than the 95% intervals, and where it does not: each frontier point against the best baseline point
    that costs no more on that axis (reads, peak: at most as many; throughput: at least as much)."""
    lines = []
    s = summary[summary["samples"] > 0].reset_index(drop=True) if len(summary) else summary
    if not len(s) or baseline not in set(s["method"]):
        return lines
    base = s[s["method"] == baseline]
    for method in [m for m in dict.fromkeys(s["method"]) if m != baseline]:
        mine = s[s["method"] == method].reset_index(drop=True)
        for col, name, minimize, _ in AXES:
            if col not in s or mine[col].isna().all():
                continue
            front = pareto(list(mine[col]), list(mine["accuracy_majority"]), minimize_x=minimize)
            above, level, below, beyond = [], [], [], []
            for i in front:
                r = mine.iloc[i]
                ok = base[(base[col] <= r[col]) if minimize else (base[col] >= r[col])]
                tag = f"{r['W']}-{r['L']}"
                if ok.empty:
                    beyond.append(tag)
                    continue
                best = ok.loc[ok["accuracy_majority"].idxmax()]
                if r["accuracy_majority_lo"] > best["accuracy_majority_hi"]:
                    above.append(f"{tag} ({r['accuracy_majority']:.2f} vs {best['W']}-{best['L']}'s "
                                 f"{best['accuracy_majority']:.2f})")
                elif r["accuracy_majority_hi"] < best["accuracy_majority_lo"]:
                    below.append(f"{tag} ({r['accuracy_majority']:.2f} vs {best['W']}-{best['L']}'s "
                                 f"{best['accuracy_majority']:.2f})")
                else:
                    level.append(f"{tag} ({r['accuracy_majority']:.2f} vs {best['W']}-{best['L']}'s "
                                 f"{best['accuracy_majority']:.2f})")
            lines.append(f"- **{method}** vs {baseline}, {name}: above by more than the intervals at "
                         f"{', '.join(above) or 'no point'}; within the intervals at {', '.join(level) or 'no point'}"
                         + (f"; below at {', '.join(below)}" if below else "")
                         + (f"; beyond every {baseline} point (none costs as little) at {', '.join(beyond)}"
                            if beyond else "") + ".")
    return lines


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


def _place_labels(ax, xs, ys, texts, fontsize=7):
    """Labels beside their points, each at the first of a few offsets where it overlaps no label
    placed before it and no other point (display coordinates; greedy)."""
    fig = ax.figure
    fig.canvas.draw()
    to_disp = ax.transData.transform
    pts = [to_disp((x, y)) for x, y in zip(xs, ys)]
    char_w, h = fontsize * 0.62 * fig.dpi / 72, fontsize * 1.2 * fig.dpi / 72
    offsets = [(5, 4), (5, -12), (-8, 8), (-8, -16), (5, 14), (5, -22), (-8, 20), (-8, -28), (12, 26), (12, -34)]
    boxes = []

    def hits(b):
        x0, y0, x1, y1 = b
        return any(not (x1 < c0 or c1 < x0 or y1 < d0 or d1 < y0) for c0, d0, c1, d1 in boxes) or \
            any(x0 - 3 < px < x1 + 3 and y0 - 3 < py < y1 + 3 for px, py in pts)

    for (px, py), text, x, y in zip(pts, texts, xs, ys):
        w = char_w * len(text)
        choice = None
        for dx, dy in offsets:
            ox = dx * fig.dpi / 72
            oy = dy * fig.dpi / 72
            bx0 = px + ox if dx >= 0 else px + ox - w
            box = (bx0, py + oy, bx0 + w, py + oy + h)
            if not hits(box):
                choice = (dx, dy, box)
                break
        if choice is None:
            dx, dy = offsets[0]
            bx0 = px + dx * fig.dpi / 72
            choice = (dx, dy, (bx0, py + dy * fig.dpi / 72, bx0 + w, py + dy * fig.dpi / 72 + h))
        dx, dy, box = choice
        boxes.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha="left" if dx >= 0 else "right", va="bottom", zorder=5)


def plot(summary, out_dir: Path) -> list[Path]:
    """``hyperscaling.png``: maj@W (95% intervals) against the three axes, points labelled W-L, one
    colour per method, each method's Pareto frontier; ``accuracy_vs_W.png``: maj@W and per-sample
    accuracy against W per method, one line per L; ``latency_percentiles.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    s = summary[summary["samples"] > 0].reset_index(drop=True) if len(summary) else summary
    paths = []
    if not len(s):
        return paths
    multi = s["run"].nunique() > 1
    s = s.assign(series=[f"{r['run']}:{r['method']}" if multi else r["method"] for _, r in s.iterrows()])
    series = list(dict.fromkeys(s["series"]))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(series)}
    fig, axs = plt.subplots(1, 3, figsize=(17, 5.6), sharey=True)
    for ax, (col, xlabel, minimize, logx) in zip(axs, AXES):
        have = s[s[col].notna()] if col in s else s.iloc[0:0]
        for key in series:
            m = have[have["series"] == key].reset_index(drop=True)
            if m.empty:
                continue
            y = m["accuracy_majority"]
            err = [(y - m["accuracy_majority_lo"]).clip(lower=0), (m["accuracy_majority_hi"] - y).clip(lower=0)]
            ax.errorbar(m[col], y, yerr=err, fmt="o", color=colors[key], ms=5, capsize=2.5, lw=0.9,
                        label=key, zorder=3)
            front = pareto(list(m[col]), list(y), minimize_x=minimize)
            ax.plot([m[col][i] for i in front], [y[i] for i in front], "-", color=colors[key], lw=1.4,
                    alpha=0.7, zorder=2)
        if len(have):
            if logx and (have[col] > 0).all():
                ax.set_xscale("log")
            ax.set_ylim(-0.05, 1.08)
            _place_labels(ax, list(have[col]), list(have["accuracy_majority"]),
                          [f"{r['W']}-{r['L']}" for _, r in have.iterrows()])
        ax.set_xlabel(xlabel + (" (log)" if logx else "") + ("  (better: left)" if minimize else "  (better: right)"))
        ax.grid(alpha=0.3)
    axs[0].set_ylabel("accuracy, majority vote over W samples (95% interval)")
    labelled = next((ax for ax in axs if ax.get_legend_handles_labels()[0]), None)
    if labelled is not None:  # below the panels, where it covers no point
        handles, labels = labelled.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False,
                   title="method (line: its Pareto frontier; bars: 95% intervals)", title_fontsize=9)
    fig.suptitle("W-L configurations (label W-L: W samples per question, L tokens at most)", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out_dir / "hyperscaling.png", dpi=110)
    plt.close(fig)
    paths.append(out_dir / "hyperscaling.png")
    Ls = sorted(set(s["L"]))
    fig, axs = plt.subplots(1, len(series), figsize=(4.2 * len(series) + 1, 4.2), sharey=True, squeeze=False)
    for ax, key in zip(axs[0], series):
        m = s[s["series"] == key]
        for j, L in enumerate(Ls):
            g = m[m["L"] == L].sort_values("W")
            if g.empty:
                continue
            for col, style in (("accuracy_majority", "-o"), ("accuracy", ":s")):
                lo, hi = g[f"{col}_lo"], g[f"{col}_hi"]
                ax.errorbar(g["W"] * (1 + 0.04 * (j - (len(Ls) - 1) / 2)), g[col],
                            yerr=[(g[col] - lo).clip(lower=0), (hi - g[col]).clip(lower=0)], fmt=style,
                            color=plt.cm.viridis(j / max(1, len(Ls) - 1) * 0.8), ms=4, capsize=2, lw=1,
                            label=f"L={L} " + ("maj@W" if col == "accuracy_majority" else "per sample"))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(s["W"])))
        ax.set_xticklabels([str(w) for w in sorted(set(s["W"]))])
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("W (samples per question)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axs[0][0].set_ylabel("accuracy (95% interval)")
    axs[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_W.png", dpi=110)
    plt.close(fig)
    paths.append(out_dir / "accuracy_vs_W.png")
    label_of = (lambda r: r["series"])
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


def _ci(key):
    def cell(r):
        v, lo, hi = r.get(key), r.get(f"{key}_lo"), r.get(f"{key}_hi")
        if v is None or v != v:
            return "–"
        return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if lo == lo and hi == hi else f"{v:.2f}"
    return cell


def _batch(r):
    used = r.get("max_batch")
    if used is None or used != used:
        return "–"
    mark = "" if r.get("max_batch_verified") else (" (retracted!)" if r.get("max_batch_verified") is False else " (?)")
    pred = r.get("max_batch_predicted")
    backed = pred == pred and pred is not None and used < pred and not r.get("max_batch_capped")
    return (f"{used:.0f}" + (f" of {pred:.0f}" if r.get("max_batch_capped") else "")
            + (" (filled)" if r.get("max_batch_filled") else "")
            + (f" (verified after {pred:.0f} retracted)" if backed and r.get("max_batch_verified") else "") + mark)


ACCURACY_COLUMNS = [("method", "method", "{}"), ("W", "W", "{}"), ("L", "L", "{}"),
                    ("status", "status", "{}"), ("questions", "questions", "{:.0f}"),
                    ("failed", "failed", "{:.0f}"), ("accuracy", "acc/sample [95%]", _ci("accuracy")),
                    ("accuracy_majority", "maj@W [95%]", _ci("accuracy_majority")),
                    ("pass_at_w", "pass@W [95%]", _ci("pass_at_w")),
                    ("kv_reads_per_question", "KV reads/question", "{:.3g}"),
                    ("peak_kv_per_question", "peak KV tok/question", "{:.0f}"),
                    ("max_batch", "max batch (questions)", _batch),
                    ("output_tok_s", "out tok/s at max batch", "{:.1f}"),
                    ("decode_tok_s", "decode tok/s", "{:.1f}"),
                    ("pct_of_bound", "% of bandwidth bound", "{:.1f}")]
_COLUMNS = [("method", "method", "{}"), ("W", "W", "{}"), ("L", "L", "{}"), ("mode", "mode", "{}"),
            ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
            ("ttft_p99_s", "TTFT p99 s", "{:.3f}"), ("tpot_p50_s", "TPOT p50 s", "{:.3f}"),
            ("e2e_p50_s", "E2E p50 s", "{:.2f}"), ("e2e_p99_s", "E2E p99 s", "{:.2f}"),
            ("peak_kv_tokens", "server peak KV tokens", "{:.0f}"),
            ("peak_running_reqs", "peak running", "{:.0f}"), ("retractions", "retractions", "{:.0f}"),
            ("cached_tokens_mean", "cached tok", "{:.0f}"),
            ("store_ratio", "store ratio", "{:.2f}"), ("store_hits", "store hits", "{:.0f}"),
            ("fused_pages", "fused pages", "{:.0f}"), ("fused_share", "fused share", "{:.2f}")]


def markdown_table(summary, columns=None) -> str:
    cols = [c for c in (columns or ACCURACY_COLUMNS) if c[0] in summary.columns]
    if len(summary) and "run" in summary and summary["run"].nunique() > 1:
        cols = [("run", "run", "{}")] + cols
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "---|" * len(cols)]
    for _, r in summary.iterrows():
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if callable(fmt):
                cells.append(fmt(r))
            elif v is None or (isinstance(v, float) and v != v):
                cells.append("–")
            else:
                cells.append(fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict]) -> str:
    lines = ["| method | vs | W | L | questions | Δ maj@W [95%] | wins / losses | Δ acc/sample [95%] |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['baseline']} | {r['W']} | {r['L']} | {r['questions']} | "
                     f"{r['d_majority']:+.2f} [{r['d_majority_lo']:+.2f}, {r['d_majority_hi']:+.2f}] | "
                     f"{r['wins']} / {r['losses']} | {r['d_per_sample']:+.2f} "
                     f"[{r['d_per_sample_lo']:+.2f}, {r['d_per_sample_hi']:+.2f}] |")
    return "\n".join(lines)


def write_report(metas: list[dict], summary, out_dir: Path, plots: list[Path], paired: list[dict] | None = None,
                 verdicts: list[str] | None = None) -> Path:
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
        bw = [b["bytes_s"] for b in m.get("bandwidth") or []]
        if bw:
            parts.append(f"- KV budget {m.get('budget_tokens') or 'SGLang default'} tokens per server; memory "
                         f"bandwidth (copy benchmark, this machine) {sorted(bw)[len(bw) // 2] / 1e9:.1f} GB/s; "
                         f"weights {m.get('weight_bytes', 0) / 2**20:.0f} MiB and "
                         f"{m.get('kv_bytes_per_token', 0)} KV bytes per token at the servers' dtype "
                         f"({m.get('server_dtype')}); prompts {m.get('prompt_tokens_mean', 0):.0f} tokens on average"
                         + (f"; resumed {', '.join(m['resumed'])}" if m.get("resumed") else ""))
    parts += ["", "## Accuracy and the three axes", "", markdown_table(summary), ""]
    if verdicts:
        parts += ["## Frontiers against vanilla", "",
                  "Each point of a method's Pareto frontier (maj@W against the axis) against the most "
                  "accurate vanilla (`none`) point that costs no more on that axis; *above* means the two "
                  "95% intervals do not overlap.", ""] + verdicts + [""]
    if paired:
        parts += ["## Paired against vanilla (same questions, same W and L)", "", paired_table(paired), ""]
    parts += ["## Latency and server figures", "", markdown_table(summary, _COLUMNS), ""]
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
               "a per-head slot pool, so KV reads are the server's own count of the tokens each decode "
               "step attends and peak KV tokens the pool's peak holdings (dense-token equivalents); its "
               "radix cache shares a question's prompt between its W threads, counted once.",
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
              "Intervals are 95% over questions (docs/metrics.md): Wilson for maj@W (the majority answer "
              "over the W samples is right) and pass@W (any sample is right), a bootstrap over questions "
              "for acc/sample (the share of samples that are right). KV reads/question: decode-step KV "
              "token reads of the W samples of a question, summed over layers and KV heads (the server's "
              "own count for DMS, computed from lengths for a dense cache). Peak KV tok/question: what one "
              "question holds at its peak whatever else runs (DMS: the prompt slots its samples share from "
              "the radix cache once, plus each sample's own peak in its per-head pool; a dense cache: the "
              "prompt once, shared by the W samples through the prefix cache, plus every generated token). "
              "Max batch: the questions of that size the server's KV budget holds at once (predicted from a "
              "pilot of a few questions, then the rest of the questions "
              "run at that concurrency; `(filled)`: fewer questions were left than fit, so one more wave "
              "of as many as fit (questions already answered, not counted again) measured the throughput at "
              "that batch; `of N`: fewer were left and the batch was not filled; `verified after N "
              "retracted`: the server retracted requests at the predicted N, so the harness ran waves of "
              "fewer questions at once (each a quarter fewer, on questions already answered, which are not "
              "counted again) until one had no retraction; `retracted!`: none did). Out tok/s at max "
              "batch: output tokens of the phase at that batch over its span. Decode tok/s: max batch x W / "
              "TPOT p50 of that phase; % of bandwidth bound: "
              "decode tok/s over what the measured memory bandwidth allows when each decode step reads "
              "the weights and the KV held (max batch x peak per question). Server peak KV tokens: the "
              "largest `sglang:num_used_tokens` (or DMS's held tokens) seen while polling `/metrics` "
              "every 0.5 s. Store ratio and store hits: the KVTC storage tier after the configuration's "
              "flush. The device cache is flushed before each configuration.", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def build_many(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    import pandas as pd

    if not run_dirs:
        raise KvsqueezeError("report: expected at least one run directory")
    metas, summaries, samples = [], [], []
    outcomes: dict = {}
    for d in run_dirs:
        meta, configs, df = load_run(Path(d))
        metas.append(meta)
        summaries.append(summarize(meta, configs, df, outcomes))
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
    pairs = paired_rows(summary, outcomes) if len(metas) == 1 else []
    verdicts = frontier_verdicts(summary) if len(metas) == 1 else []
    return write_report(metas, summary, out_dir, plots, pairs, verdicts)


def build(run_dir: Path) -> Path:
    return build_many([Path(run_dir)], Path(run_dir))
