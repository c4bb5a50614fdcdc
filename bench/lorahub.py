"""LoraHub: quality on the held-out composite tasks, and speed against the original package.

    python bench/lorahub.py quality [--seeds 3 --test 20]   # -> bench/results/lorahub_quality.md
    python bench/lorahub.py speed   [--budget 40]           # -> bench/results/lorahub_speed.md

quality: SmolLM2 with the demo adapters; for each composite task, 5 and 20 examples, 3 seeds:
zero-shot base, uniform average of all adapters, LoraHub in delta space (exact weighted sum),
LoraHub in factor space (the original's (Σw·B)(Σw·A)), and the best single adapter, as exact
match on the test split. All composed adapters are judged together in mixed batches.

speed: one small random T5 (seq2seq, as the original requires) with 20 rank-16 LoRA adapters and the same
examples; the original `lorahub` package (PyPI lorahub==0.1.0; needs
`pip install --no-deps lorahub==0.1.0 && pip install datasets pandas`) rebuilds and reloads a
merged state dict per evaluation; ours installs the sources once and changes only per-row weights.
Both run NGOpt with the same budget in this process; both final weights are then scored with the
same objective (mean target cross-entropy per token + 0.05·mean|w|) so best losses compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapter_fusion import load_adapter, merge
from adapter_fusion.evaluate import evaluate
from adapter_fusion.lorahub import lorahub_search, runtime_objective
from adapter_fusion.models import DEMO_ADAPTERS, default_base, tiny_t5
from adapter_fusion.runtime import Runtime
from adapter_fusion.tasks import TASKS, examples, user_message

RESULTS = Path(__file__).parent / "results"
TARGETS = ["q", "k", "v", "o"]  # T5 attention projections


def quality(args: argparse.Namespace) -> None:
    dirs = {p.name: p for p in sorted(DEMO_ADAPTERS.glob("*")) if (p / "adapter_config.json").is_file()}
    adapters = {n: load_adapter(p) for n, p in dirs.items()}
    sources = list(adapters.values())
    runtime = Runtime(default_base())
    composites = [t for t, spec in TASKS.items() if spec.composite]
    judged: dict[str, object] = {"base": None, "uniform": merge(sources, "linear", [1.0 / len(sources)] * len(sources)).adapter, **adapters}
    plan = []  # (task, n examples, seed, rule, name)
    for task in composites:
        for n in args.examples:
            shots = [(user_message(task, ex), ex.target) for ex in examples(task, "train", n)]
            for seed in range(args.seeds):
                for rule in ("linear", "factor_linear"):
                    start = time.perf_counter()
                    result = lorahub_search(runtime, sources, shots, budget=args.budget, seed=seed, rule=rule, parallel=args.parallel)
                    name = f"{task}/{n}/{seed}/{rule}"
                    judged[name] = result.adapter
                    plan.append((task, n, seed, rule, name))
                    print(f"{name}: best loss {result.best_loss:.3f} in {time.perf_counter() - start:.1f} s", flush=True)
    scores = {}
    for task in composites:  # everything judged on this task, in mixed batches
        names = ["base", "uniform", *adapters, *[p[4] for p in plan if p[0] == task]]
        for s in evaluate(runtime, {k: judged[k] for k in names}, [task], limit=args.test):
            scores[(s.adapter, task)] = s.accuracy
    lines = [f"# LoraHub on held-out composite tasks ({args.test} test examples, exact match, budget {args.budget})", ""]
    lines += ["| task | examples | zero-shot | uniform | LoraHub delta (mean ± sd over seeds) | LoraHub factor | best single adapter |", "|---|---|---|---|---|---|---|"]
    for task in composites:
        best_single = max(scores[(a, task)] for a in adapters)
        for n in args.examples:
            cells = []
            for rule in ("linear", "factor_linear"):
                values = [scores[(p[4], task)] for p in plan if p[0] == task and p[1] == n and p[3] == rule]
                cells.append(f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}")
            lines.append(f"| {task} | {n} | {scores[('base', task)]:.2f} | {scores[('uniform', task)]:.2f} | {cells[0]} | {cells[1]} | {best_single:.2f} |")
    (RESULTS / "lorahub_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def speed(args: argparse.Namespace) -> None:
    here = Path(__file__).parent.resolve()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # this file is also named lorahub
    sys.modules.pop("lorahub", None)
    from lorahub.algorithm import default_get_loss, lorahub_learning
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = tiny_t5(root / "t5", tokenizer_from=default_base(), d_model=args.d_model)
        dirs = []
        for i in range(args.adapters):
            torch.manual_seed(i)
            config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="SEQ_2_SEQ_LM", init_lora_weights=False)
            model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(base), config)
            model.save_pretrained(root / f"lora{i}")
            dirs.append(str(root / f"lora{i}"))
        rng = np.random.default_rng(0)
        words = "apple river stone cloud green music paper light table window garden silver".split()
        inputs = [" ".join(rng.choice(words, 6)) for _ in range(args.n_examples)]
        outputs = [" ".join(rng.choice(words, 3)) for _ in range(args.n_examples)]

        stamps: list[float] = []

        def timed_regular(weights):  # called once per evaluation, after the loss
            stamps.append(time.perf_counter())
            return 0.05 * sum(abs(x) for x in weights) / len(weights)

        start = time.perf_counter()
        theirs, _, _ = lorahub_learning(dirs, inputs, outputs, args.budget, model_name_or_path=str(base), get_loss=default_get_loss, get_regular=timed_regular, seed=0)
        their_total = time.perf_counter() - start
        their_per_eval = (stamps[-1] - stamps[0]) / (len(stamps) - 1)

        adapters = [load_adapter(d) for d in dirs]
        runtime = Runtime(base, targets=TARGETS)
        start = time.perf_counter()
        ours = lorahub_search(runtime, adapters, list(zip(inputs, outputs)), budget=args.budget, seed=0, chat=False)
        our_total = time.perf_counter() - start
        our_per_eval = ours.seconds / len(ours.losses)
        batched = lorahub_search(runtime, adapters, list(zip(inputs, outputs)), budget=args.budget, seed=0, chat=False, parallel=8)
        batched_per_eval = batched.seconds / len(batched.losses)

        objective = runtime_objective(runtime, adapters, list(zip(inputs, outputs)), chat=False)

        def common(w) -> float:
            return objective(np.array([w]))[0] + 0.05 * float(np.abs(w).mean())

        lines = [
            f"# LoraHub speed: small random T5 (d_model {args.d_model}), {args.adapters} rank-16 adapters ({', '.join(TARGETS)}), "
            f"{args.n_examples} examples, NGOpt budget {args.budget}, {torch.get_num_threads()} CPU threads",
            "",
            "| | s / evaluation | total s (incl. loading) | best objective (common definition) |",
            "|---|---|---|---|",
            f"| original `lorahub` 0.1.0 | {their_per_eval:.4f} | {their_total:.1f} | {common(np.asarray(theirs)):.4f} |",
            f"| adapter-fusion | {our_per_eval:.4f} | {our_total:.1f} | {common(np.asarray(ours.weights)):.4f} |",
            f"| adapter-fusion, 8 candidates per forward | {batched_per_eval:.4f} | | {common(np.asarray(batched.weights)):.4f} |",
            "",
            f"Per evaluation: {their_per_eval / our_per_eval:.1f}x faster one at a time, {their_per_eval / batched_per_eval:.1f}x with batched candidates.",
        ]
        (RESULTS / "lorahub_speed.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--examples", type=int, nargs="*", default=[5, 20])
    q.add_argument("--budget", type=int, default=40)
    q.add_argument("--parallel", type=int, default=4)
    q.add_argument("--test", type=int, default=20)
    s = sub.add_parser("speed")
    s.add_argument("--budget", type=int, default=40)
    s.add_argument("--n-examples", type=int, default=5)
    s.add_argument("--d-model", type=int, default=384)
    s.add_argument("--adapters", type=int, default=20)  # LoraHub's default pool size
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    quality(args) if args.part == "quality" else speed(args)


if __name__ == "__main__":
    main()
