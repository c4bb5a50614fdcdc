"""Which composition method wins: one table on tasks that no single demo adapter solves.

    python bench/composition.py [--seeds 3 --examples 5 20 --test 20]   # -> bench/results/composition.md

Tasks: the mixtures (requests of two demo tasks interleaved, each with its own instruction: a
weighted sum of those two adapters can solve them, any single adapter only its share), and, the
LoraHub paper's setting, single tasks with their own adapter removed from the pool. Every method
sees the pool (all demo adapters but a held-out task's own) and the same n training examples of
the target task (drawn per seed), on SmolLM2:
- zero-shot (the base), uniform (Σ ΔW / k), TIES (density 0.2, PEFT's rule; no data),
- LoraHub (nevergrad NGOpt, budget 40, the paper's defaults: from 0, L1 0.05),
- learned per source and per module (Adam from 0, LoraHub's L1, 30 steps, full batch),
- RegMean and Fisher, each source's examples = the target task's n examples (what every method gets).
Judged on the test split: exact match and mean target cross-entropy per token, mean ± sd over
seeds; wall time per method (fit + merge). All judged adapters run together in mixed batches.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from adapter_fusion import load_adapter, merge
from adapter_fusion.data_merge import merge_with_data
from adapter_fusion.evaluate import evaluate
from adapter_fusion.coefficient_fit import merge_learned
from adapter_fusion.lorahub import lorahub_search
from adapter_fusion.models import DEMO_ADAPTERS, default_base
from adapter_fusion.runtime import Runtime
from adapter_fusion.tasks import MIXTURES, examples, user_message

RESULTS = Path(__file__).parent / "results" / "composition.md"
FIXED = ["zero-shot", "uniform", "ties"]  # no data: one adapter per task
FITTED = ["lorahub", "learned/source", "learned/module", "regmean", "fisher"]


def fit(method: str, runtime: Runtime, pool: list, shots: list[tuple[str, str]], seed: int, steps: int):
    """One data-aware composition of the pool from the shots; returns the adapter."""
    zeros = [0.0] * len(pool)
    if method == "lorahub":
        return lorahub_search(runtime, pool, shots, budget=40, seed=seed, parallel=4).adapter
    if method.startswith("learned/"):
        per = method.split("/")[1]
        return merge_learned(pool, shots, runtime, zeros, {"per": per, "steps": steps}, seed=seed).adapter
    return merge_with_data(pool, method, [shots] * len(pool), runtime.base_dir).adapter


def cell(runs: list[tuple[float, float]]) -> str:
    accuracy, loss = [a for a, _ in runs], [x for _, x in runs]
    sd = lambda xs: statistics.pstdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    return f"{statistics.mean(accuracy):.2f} ± {sd(accuracy):.2f} ({statistics.mean(loss):.2f} ± {sd(loss):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--examples", type=int, nargs="*", default=[5, 20])
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mixtures", nargs="*", default=list(MIXTURES))
    parser.add_argument("--held-out", nargs="*", default=["words_to_number"])
    parser.add_argument("--methods", nargs="*", default=FITTED)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    demo = {p.name: load_adapter(p) for p in sorted(DEMO_ADAPTERS.glob("*")) if (p / "adapter_config.json").is_file()}
    runtime = Runtime(default_base())
    runs: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)  # (task, n, method) -> (acc, loss) per seed
    seconds: dict[str, list[float]] = defaultdict(list)
    singles: dict[str, tuple[str, float, float]] = {}
    done: list[str] = []
    for task in [*args.mixtures, *args.held_out]:
        pool_names = [n for n in demo if n != task]
        pool = [demo[n] for n in pool_names]
        judged = {"zero-shot": None, "uniform": merge(pool, "linear", [1 / len(pool)] * len(pool)).adapter}
        start = time.perf_counter()
        judged["ties"] = merge(pool, "ties", parameters={"density": 0.2}, rank=32).adapter
        seconds["ties"].append(time.perf_counter() - start)
        judged |= {f"single/{n}": demo[n] for n in pool_names}
        if task in MIXTURES:
            judged["parts, 0.5 each"] = merge([demo[p] for p in MIXTURES[task]], "linear", [0.5, 0.5]).adapter
        plan = []
        for n in args.examples:
            train = examples(task, "train", 200)
            for seed in range(args.seeds):
                picked = random.Random(seed).sample(train, n)
                shots = [(user_message(task, ex), ex.target) for ex in picked]
                for method in args.methods:
                    start = time.perf_counter()
                    judged[f"{method}/{n}/{seed}"] = fit(method, runtime, pool, shots, seed, args.steps)
                    seconds[method].append(time.perf_counter() - start)
                    plan.append((n, method, f"{method}/{n}/{seed}"))
                    print(f"{task} n={n} seed={seed} {method}: {seconds[method][-1]:.1f} s", flush=True)
        scores = {s.adapter: (s.accuracy, s.mean_loss) for s in evaluate(runtime, judged, [task], limit=args.test)}
        for n in args.examples:
            for method in ["zero-shot", "uniform", "ties"]:
                runs[(task, n, method)] = [scores[method]]
            for m, method, name in plan:
                if m == n:
                    runs[(task, n, method)].append(scores[name])
        best = max((k for k in scores if k.startswith("single/")), key=lambda k: (scores[k][0], -scores[k][1]))
        singles[task] = (best.split("/", 1)[1], *scores[best])
        if task in MIXTURES:
            singles[task + " oracle"] = ("parts, 0.5 each", *scores["parts, 0.5 each"])
        print(f"{task}: judged {len(judged)} adapters", flush=True)
        done.append(task)
        write(args, done, runs, seconds, singles, time.perf_counter() - started)  # after each task: a long run keeps what it did


def write(args, tasks: list[str], runs, seconds, singles, total: float) -> None:
    methods = [*FIXED, *args.methods]
    lines = [
        f"# Composition methods on tasks no single adapter solves ({args.test} test examples, {args.seeds} seeds)",
        "",
        "Each cell: exact match, then (mean target cross-entropy per token on the test split), mean ± sd over seeds.",
        "Mixtures: " + ", ".join(f"{t} = {' + '.join(MIXTURES[t])}" for t in tasks if t in MIXTURES)
        + f"; held out (own adapter removed from the pool): {', '.join(t for t in tasks if t not in MIXTURES) or 'none'}.",
        "",
        "| task | n | " + " | ".join(methods) + " | best single adapter | winner |",
        "|---|---|" + "---|" * (len(methods) + 2),
    ]
    wins: dict[str, int] = defaultdict(int)
    for task in tasks:
        name, accuracy, loss = singles[task]
        for n in args.examples:
            means = {m: (statistics.mean(a for a, _ in runs[(task, n, m)]), -statistics.mean(x for _, x in runs[(task, n, m)])) for m in methods}
            winner = max(means, key=means.get)
            wins[winner] += 1
            lines.append(f"| {task} | {n} | " + " | ".join(cell(runs[(task, n, m)]) for m in methods) + f" | {accuracy:.2f} ({loss:.2f}) {name} | {winner} |")
    lines += ["", "Reference, mixtures: the two parts' adapters at 0.5 each (the answer a fit should find):", ""]
    lines += [f"- {t}: {singles[t + ' oracle'][1]:.2f} ({singles[t + ' oracle'][2]:.2f})" for t in tasks if t in MIXTURES]
    lines += ["", "| method | wall time per fit, mean s (2 CPU cores) | wins (best mean exact match, then loss) |", "|---|---|---|"]
    lines += [f"| {m} | {statistics.mean(seconds[m]) if seconds.get(m) else 0.0:.1f} | {wins[m]} |" for m in methods]
    command = " ".join(["python bench/composition.py", *sys.argv[1:]])
    lines += ["", f"Generated by `{command}` in {total:.0f} s."]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
