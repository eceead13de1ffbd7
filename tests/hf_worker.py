"""A real Hugging Face Trainer run on a tiny GPT-2, checkpointed by CkptsCallback.

    python tests/hf_worker.py RUN_DIR LOSS_LOG [--async]

Resumes from RUN_DIR when it holds checkpoints. 32 samples in batches of 4 make
8 steps an epoch; 2 epochs, a save and an evaluation every 4 steps (so step 8 ends
an epoch and step 12 is mid-epoch). Each run appends ``start STEP``, and each logged step
``step loss`` (the loss as repr, so exact) to LOSS_LOG. The tiny GPT-2 (2 layers,
width 32, vocabulary 64) trains on seeded synthetic tokens with dropout, a
warmup + cosine schedule, shuffling and an evaluation every few steps.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

VOCAB = 64
SEQUENCE = 16


class TokenData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Seeded random tokens with a learnable pattern: each odd position repeats the token
    before it, for a ``repeat_share`` of them."""

    def __init__(self, count: int, seed: int, repeat_share: float = 1.0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (count, SEQUENCE), generator=generator)
        repeat = torch.rand(count, SEQUENCE // 2, generator=generator) < repeat_share
        self.tokens[:, 1::2] = torch.where(repeat, self.tokens[:, 0::2], self.tokens[:, 1::2])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQUENCE, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(config)


def training_args(output_dir: Path, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": str(output_dir), "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8, "num_train_epochs": 2, "learning_rate": 3e-3,
        "warmup_steps": 3, "lr_scheduler_type": "cosine", "logging_steps": 1,
        "eval_strategy": "steps", "eval_steps": 4, "save_strategy": "steps", "save_steps": 4,
        "seed": 0, "use_cpu": True, "report_to": "none", "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def make_trainer(args: Any, callbacks: list[Any], train_size: int = 32,
                 eval_repeat_share: float = 1.0, **kwargs: Any) -> Any:
    from transformers import Trainer

    model = tiny_gpt2()
    evaluation = TokenData(16, seed=2, repeat_share=eval_repeat_share)
    return Trainer(model=model, args=args, train_dataset=TokenData(train_size, seed=1),
                   eval_dataset=evaluation, callbacks=callbacks, **kwargs)


def main(run_dir: str, loss_log: str, async_save: bool) -> None:
    from transformers import TrainerCallback

    from ckpts.integrations.transformers import CkptsCallback

    class LossLog(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            with open(loss_log, "a") as f:
                f.write(f"start {state.global_step}\n")

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                with open(loss_log, "a") as f:
                    f.write(f"{state.global_step} {logs['loss']!r}\n")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            time.sleep(0.1)  # so that a test's SIGKILL lands well before the next save

    callback = CkptsCallback(run_dir, async_save=async_save)
    trainer = make_trainer(training_args(Path(run_dir)), [callback, LossLog()])
    resume = callback.resume_path()
    print(f"resume {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    print("done", flush=True)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], "--async" in sys.argv[3:])
