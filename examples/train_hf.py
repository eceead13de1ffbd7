"""Hugging Face Trainer with ckpts: kill it at any moment, run it again, it resumes exactly.

    python examples/train_hf.py runs/hf-example

A tiny GPT-2 (built from a config, no download) learns a token pattern on CPU in
seconds. CkptsCallback turns Trainer's saves into atomic, hash-verified,
pickle-free checkpoints, keeps the two best by eval loss plus the newest, and
loads the best one at the end. ckpts' log (on stderr) says what it saved, removed
and, on a resume, restored: the objects and random generators of which checkpoint.
"""

from __future__ import annotations

import logging
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

import ckpts
from ckpts.integrations.transformers import CkptsCallback


class Pairs(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random tokens where every second token repeats the one before it."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        half = torch.randint(0, 64, (count, 8), generator=generator)
        self.tokens = half.repeat_interleave(2, dim=1)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def main(run_dir: str) -> None:
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                       n_head=2, bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(
        output_dir=run_dir, num_train_epochs=2, per_device_train_batch_size=8,
        learning_rate=3e-3, warmup_steps=5, lr_scheduler_type="cosine",
        eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
        logging_steps=4, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        use_cpu=True, report_to="none", disable_tqdm=True, log_level="error",
    )
    callback = CkptsCallback(run_dir, keep=[ckpts.KeepBest(2, "eval_loss"), ckpts.KeepLast(1)])
    trainer = Trainer(model=model, args=args, train_dataset=Pairs(96, seed=1),
                      eval_dataset=Pairs(32, seed=2), callbacks=[callback])

    resume = callback.resume_path()  # None on a fresh run
    latest = callback.manager.latest()
    print(f"starting at step {0 if resume is None or latest is None else latest.step}")
    trainer.train(resume_from_checkpoint=resume)

    best = callback.manager.best("eval_loss")
    assert best is not None
    print(f"kept: {[c.step for c in callback.manager.checkpoints()]}")
    print(f"best: step {best.step}, eval_loss {best.metrics['eval_loss']:.4f} (loaded)")


if __name__ == "__main__":
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("ckpts").setLevel(logging.INFO)
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/hf-example")
