"""Train one LoRA adapter per (non-composite) task on the default base model, on the CPU.

    python examples/train_adapters.py                   # every task, into examples/adapters/<task>
    python examples/train_adapters.py --tasks uppercase --steps 60

Deterministic (fixed seeds, fixed task splits); the loss is on the answer tokens only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter_fusion.models import default_base
from adapter_fusion.tasks import TASKS, examples, user_message

HERE = Path(__file__).parent


def encode(tokenizer, task: str, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels) with labels -100 everywhere but the answer and its end token."""
    rows, labels = [], []
    for ex in batch:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(task, ex)}], add_generation_prompt=True, tokenize=False
        )
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(ex.target + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def train(task: str, out: Path, steps: int, rank: int, batch_size: int, lr: float) -> dict:
    torch.manual_seed(0)
    base = default_base()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    data = examples(task, "train", steps * batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=task)
    for step in bar:
        ids, labels = encode(tokenizer, task, data[step * batch_size : (step + 1) * batch_size])
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != (tokenizer.pad_token_id or 0)), labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(out)
    meta = {"task": task, "steps": steps, "batch_size": batch_size, "lr": lr, "rank": rank, "lora_alpha": 2 * rank,
            "targets": ["q_proj", "v_proj"], "final_loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - start)}
    (out / "training.json").write_text(json.dumps(meta, indent=2))
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=[t for t, spec in TASKS.items() if not spec.composite])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=HERE / "adapters")
    args = parser.parse_args()
    for task in args.tasks:
        print(train(task, args.out / task, args.steps, args.rank, args.batch_size, args.lr))


if __name__ == "__main__":
    main()
