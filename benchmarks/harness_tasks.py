"""Which harness tasks can show the effect of W samples on the embedded model: the dense model's
per-sample accuracy, maj@W and pass@W, each with a 95% interval over questions.

On the ``dev`` split only (questions never used by ``kvsqueeze bench``, which runs the ``eval`` split).
The dense model in PyTorch (no server): the prompt is prefilled once, its cache copied to W rows,
then W samples are drawn at the harness's temperature, token by token (temperature only, as SGLang
samples with top-p 1 and no top-k); the answer is the first run of digits, as in the harness.

    python benchmarks/harness_tasks.py [--tasks needle,facts,passkey,lookup,arithmetic] [--questions 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write  # noqa: E402
from kvsqueeze.harness.stats import accuracy, score_question  # noqa: E402
from kvsqueeze.harness.tasks import extract_answer, make_questions, parse_tasks  # noqa: E402
from kvsqueeze.model import load_hf, resolve_model  # noqa: E402


@torch.no_grad()
def sample(model, tok, prompt: str, W: int, tokens: int, temperature: float, gen: torch.Generator) -> list[str]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(W)
    logits = out.logits[:, -1].repeat(W, 1)
    picked = []
    for _ in range(tokens):
        nxt = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen)
        picked.append(nxt)
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return tok.batch_decode(torch.cat(picked, 1), skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="needle,facts,passkey,lookup,arithmetic")
    ap.add_argument("--questions", type=int, default=40, help="dev questions per task")
    ap.add_argument("--W", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8, help="tokens sampled per answer")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--out", default=str(ROOT / "results/harness/tasks"))
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tok, model = load_hf(resolve_model(None))
    rows = []
    for task in parse_tasks(args.tasks):
        t0 = time.time()
        outcomes, lengths = [], []
        for q in make_questions([task], args.questions, seed=0, split="dev"):
            texts = sample(model, tok, q.prompt, args.W, args.tokens, args.temperature, gen)
            outcomes.append(score_question(q.qid, [extract_answer(t) for t in texts], q.answer))
            lengths.append(len(tok(q.prompt).input_ids))
        acc = accuracy(outcomes)
        row = {"task": task, "prompt_tokens_mean": sum(lengths) / len(lengths), **acc.as_dict(),
               "gain_majority": acc.majority - acc.per_sample, "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{task:10s} per-sample {acc.per_sample:.2f} [{acc.per_sample_ci[0]:.2f}, {acc.per_sample_ci[1]:.2f}]  "
              f"maj@{args.W} {acc.majority:.2f} [{acc.majority_ci[0]:.2f}, {acc.majority_ci[1]:.2f}]  "
              f"pass@{args.W} {acc.pass_at_w:.2f}  prompt {row['prompt_tokens_mean']:.0f} tokens  "
              f"{row['seconds']:.0f}s", flush=True)
    cmd = "python benchmarks/harness_tasks.py " + " ".join(sys.argv[1:])
    lines = [f"# Harness tasks on the embedded model (dense, dev split): per-sample accuracy vs maj@{args.W}", "",
             f"`{cmd.strip()}`", "",
             f"{args.questions} dev questions per task (never the questions `kvsqueeze bench` runs), {args.W} samples "
             f"each at temperature {args.temperature}, {args.tokens} tokens, the dense SmolLM2-135M-Instruct in "
             "PyTorch; intervals: 95%, over questions (bootstrap for per-sample, Wilson for maj@W and pass@W).", "",
             f"| task | prompt tokens | per-sample | maj@{args.W} | pass@{args.W} | maj - per-sample |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['prompt_tokens_mean']:.0f} | {r['accuracy']:.2f} "
                     f"[{r['accuracy_lo']:.2f}, {r['accuracy_hi']:.2f}] | {r['accuracy_majority']:.2f} "
                     f"[{r['accuracy_majority_lo']:.2f}, {r['accuracy_majority_hi']:.2f}] | {r['pass_at_w']:.2f} "
                     f"[{r['pass_at_w_lo']:.2f}, {r['pass_at_w_hi']:.2f}] | {r['gain_majority']:+.2f} |")
    lines += ["", "A task can show what W buys when its per-sample accuracy lies well inside (0, 1) and maj@W "
              "rises above it by more than the intervals; `needle` and `facts` (retrieval from the middle of "
              "~650 tokens) are the default tasks of `kvsqueeze bench` for that reason."]
    write(args.out, {"command": cmd.strip(), "W": args.W, "temperature": args.temperature,
                     "questions": args.questions, "split": "dev", "rows": rows}, lines)


if __name__ == "__main__":
    main()
