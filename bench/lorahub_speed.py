"""LoraHub speed against the original package (quality: bench/composition.py, every method in one table).

    python bench/lorahub_speed.py [--budget 40]           # -> bench/results/lorahub_speed.md

Small random T5s (seq2seq, as the original requires) with 20 rank-16 LoRA adapters and the
same examples; the original `lorahub` package (PyPI lorahub==0.1.0, installed with the project's
`bench` extra: `pip install -e '.[bench]'`) rebuilds and reloads a merged state dict per
evaluation; ours installs the sources once and changes only per-row weights. Per evaluation,
both objectives score the same random weight vectors (and our factor rule must give the
original's loss); then both run a whole NGOpt search with the same budget in this process, and
both final weights are scored with one objective (mean target cross-entropy per token +
0.05·mean|w|) so best losses compare.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapter_fusion import load_adapter
from adapter_fusion.lorahub import lorahub_search, runtime_objective
from adapter_fusion.models import default_base, tiny_t5
from adapter_fusion.runtime import Runtime

RESULTS = Path(__file__).parent / "results"
TARGETS = ["q", "k", "v", "o"]  # T5 attention projections


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def speed(args: argparse.Namespace) -> None:
    from lorahub import algorithm as original

    lines = [
        f"# LoraHub speed: {args.adapters} rank-16 adapters ({', '.join(TARGETS)}) on small random T5s, {args.n_examples} examples, "
        f"{torch.get_num_threads()} CPU threads",
        "",
        f"Per evaluation: the mean over the same {args.evaluations} random weight vectors, objective only (the original's `get_score`:",
        "merge the state dicts, reload, loss; ours: one forward with per-row source weights). Search: NGOpt, budget "
        f"{args.budget}, total seconds including loading; best objective re-scored with one common definition.",
        "",
        "| T5 | original s / eval | ours s / eval | ours, 8 per forward | speed-up (1 / 8) | factor-rule loss vs original | search: original s | ours s | best objective: original | ours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    aliased = []
    for d_model in args.d_models:
        count, row = _speed_row(args, original, d_model)
        aliased.append(count)
        lines.append(row)
        print(row, flush=True)
    lines += [
        "",
        f"The original's loader leaves {'/'.join(map(str, aliased))} of its cached adapter tensors aliasing the model's live LoRA",
        "parameters (the last adapter's; peft " + _version("peft") + "), so as shipped each reload overwrites that adapter",
        "with the previous composition and its search optimises a drifting objective. Its per-evaluation",
        "timing and the loss check above use an unaliased copy of the cache; its search runs as shipped.",
    ]
    (RESULTS / "lorahub_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _speed_row(args: argparse.Namespace, original, d_model: int) -> tuple[int, str]:
    """One model size: the original's objective and search against ours, from the same adapters.
    Returns how many of the original's cached tensors alias its live model, and the table row."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = tiny_t5(root / "t5", tokenizer_from=default_base(), d_model=d_model)
        dirs = []
        for i in range(args.adapters):
            torch.manual_seed(i)
            config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="SEQ_2_SEQ_LM", init_lora_weights=False)
            get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(base), config).save_pretrained(root / f"lora{i}")
            dirs.append(str(root / f"lora{i}"))
        rng = np.random.default_rng(0)
        words = "apple river stone cloud green music paper light table window garden silver".split()
        shots = [(" ".join(rng.choice(words, 6)), " ".join(rng.choice(words, 3))) for _ in range(args.n_examples)]
        inputs, outputs = [x for x, _ in shots], [y for _, y in shots]
        vectors = rng.uniform(-1.5, 1.5, size=(args.evaluations, args.adapters))  # (E, n)

        model, tokenizer, cache = original.load_base_model_and_lora_modules(dirs, str(base))
        # Under current peft the original's cache of the last adapter aliases the model's live LoRA
        # parameters, so every reload overwrites that adapter with the previous composition. Give its
        # objective an unaliased copy so it computes its own rule (the search below runs it as shipped).
        live = {t.data_ptr() for t in model.parameters()}
        aliased = sum(t.data_ptr() in live for state in cache.values() for t in state.values())
        cache = {name: {key: t.clone() for key, t in state.items()} for name, state in cache.items()}
        dataset = original.load_dataset(inputs, outputs, tokenizer)

        def their_loss(w: np.ndarray) -> float:  # their loss is the mean per token divided by the number of examples
            l1 = original.default_l1_regularization(list(w))
            return (original.get_score(list(w), model, cache, dataset, None, original.default_get_loss, lambda _: l1) - l1) * len(shots)

        theirs_per_eval, their_losses = _per_vector(lambda batch: [their_loss(batch[0])], vectors)

        adapters = [load_adapter(d) for d in dirs]
        runtime = Runtime(base, targets=TARGETS)
        factor = runtime_objective(runtime, adapters, shots, rule="factor_linear", chat=False)  # the original's rule
        parity = max(abs(factor(w[None])[0] - t) / t for w, t in zip(vectors, their_losses))
        linear = runtime_objective(runtime, adapters, shots, chat=False)  # replaces the factor rule's slots
        ours_per_eval, _ = _per_vector(linear, vectors)
        batched_per_eval, _ = _per_vector(linear, vectors, k=8)

        start = time.perf_counter()
        their_weights, _, _ = original.lorahub_learning(dirs, inputs, outputs, args.budget, model_name_or_path=str(base), seed=0)
        their_search = time.perf_counter() - start
        start = time.perf_counter()
        ours = lorahub_search(Runtime(base, targets=TARGETS), [load_adapter(d) for d in dirs], shots, budget=args.budget, seed=0, chat=False)
        our_search = time.perf_counter() - start

        def common(w) -> float:  # mean target cross-entropy per token (exact weighted sum) + 0.05·mean|w|
            return linear(np.asarray(w)[None])[0] + 0.05 * float(np.abs(w).mean())

        return aliased, (
            f"| d_model {d_model}, 2+2 layers | {theirs_per_eval:.4f} | {ours_per_eval:.4f} | {batched_per_eval:.4f} | "
            f"**{theirs_per_eval / ours_per_eval:.1f}x** / {theirs_per_eval / batched_per_eval:.1f}x | {parity:.1e} relative | "
            f"{their_search:.1f} | {our_search:.1f} | {common(their_weights):.4f} | {common(ours.weights):.4f} |"
        )


def _per_vector(score, vectors: np.ndarray, k: int = 1) -> tuple[float, list[float]]:
    """Seconds per weight vector when `score` takes them k at a time (after one warm-up call), and the scores."""
    score(vectors[:k])
    start = time.perf_counter()
    scores = [x for first in range(0, len(vectors), k) for x in score(vectors[first : first + k])]
    return (time.perf_counter() - start) / len(vectors), scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--evaluations", type=int, default=40)
    parser.add_argument("--n-examples", type=int, default=5)
    parser.add_argument("--d-models", type=int, nargs="+", default=[64, 384])
    parser.add_argument("--adapters", type=int, default=20)  # LoraHub's default pool size
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    speed(args)


if __name__ == "__main__":
    main()
