"""The demo run: a tiny character-level language model that trains with checkpoints.

Everything the ``ckpts demo`` command needs that is not printing: a corpus generated
in-process from a seeded grammar, the model, a deterministic training loop (it
computes the validation loss every :data:`EVAL_EVERY` steps, saves a checkpoint when
that improves and every :data:`SAVE_EVERY` steps, keeps the :data:`BEST_KEPT` best by
validation loss plus the latest, and resumes from the newest one), the
one-line-per-event protocol a worker process speaks on stdout, and the check run
afterwards (bit-exact weights).

The worker entry point trains one run directory and prints its events::

    python -m ckpts.cli.demo_training RUN_DIR --steps 360

    resumed from step 0
    step 1 train_loss 3.4012...
    ...
    saved step 15 epoch 0 train_loss 2.83... val_loss 2.42...

Run it again on the same directory (for instance after ``kill -9``) and it picks up
at the newest checkpoint; the steps it then reports are bit-identical to those of a
run that was never interrupted.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

import ckpts
from ckpts.errors import InvalidArgumentError

SEED = 1234
STEPS = 360
EVAL_EVERY = 15  # how often the validation loss is computed (and a save considered)
SAVE_EVERY = 30  # a checkpoint at least this often, improved or not
BEST_KEPT = 3  # retention: the best BEST_KEPT by val_loss, plus the newest
BATCH_SIZE = 16
BLOCK_SIZE = 32
WINDOW_STRIDE = 5  # train windows start every WINDOW_STRIDE characters (they overlap)
TRAIN_SENTENCES = 40  # few enough that the model memorizes them and starts to overfit
VAL_SENTENCES = 40
PEAK_LR = 1.5e-2
WARMUP_STEPS = 20

# The grammar: each sentence picks one entry per slot. The words generalize; which
# combinations the train split happens to hold is what the model can only memorize.
_SUBJECTS = (
    "the cat", "a dog", "my aunt", "the robot", "our teacher", "a small bird",
    "the king", "her brother",
)
_VERBS = ("sees", "likes", "paints", "chases", "finds", "hides", "eats", "carries")
_OBJECTS = (
    "a red ball", "the moon", "an old map", "two apples", "the blue door", "a tiny boat",
    "some bread", "the garden",
)
_ENDINGS = ("", " today", " at night", " again", " slowly", " with joy")


# --- corpus -------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """The demo's text, split in two, and its character vocabulary."""

    train_text: str
    val_text: str
    alphabet: str

    @property
    def vocab_size(self) -> int:
        """How many distinct characters the model predicts."""
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        """Characters -> int64 token ids."""
        return torch.tensor([self.alphabet.index(c) for c in text], dtype=torch.int64)

    def decode(self, tokens: Sequence[int]) -> str:
        """Token ids -> characters."""
        return "".join(self.alphabet[t] for t in tokens)


def make_corpus(seed: int = SEED) -> Corpus:
    """Generate the train and validation text from the seeded grammar (same seed, same text).

    Example:
        >>> make_corpus().train_text[:20]  # doctest: +SKIP
        'the king hides a red'
    """
    rng = random.Random(seed)

    def sentences(count: int) -> str:
        return "".join(
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            f"{rng.choice(_ENDINGS)}. "
            for _ in range(count)
        )

    train_text, val_text = sentences(TRAIN_SENTENCES), sentences(VAL_SENTENCES)
    alphabet = "".join(sorted(set("".join((*_SUBJECTS, *_VERBS, *_OBJECTS, *_ENDINGS, ". ")))))
    return Corpus(train_text=train_text, val_text=val_text, alphabet=alphabet)


def windows(tokens: torch.Tensor, *, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) pairs of BLOCK_SIZE tokens, the targets shifted by one."""
    starts = range(0, len(tokens) - BLOCK_SIZE, stride)
    inputs = torch.stack([tokens[s : s + BLOCK_SIZE] for s in starts])
    targets = torch.stack([tokens[s + 1 : s + BLOCK_SIZE + 1] for s in starts])
    return inputs, targets


def batches_per_epoch(corpus: Corpus | None = None) -> int:
    """Optimizer steps in one pass over the train split (the last partial batch is dropped)."""
    corpus = corpus or make_corpus()
    inputs, _ = windows(corpus.encode(corpus.train_text), stride=WINDOW_STRIDE)
    return len(inputs) // BATCH_SIZE


# --- model --------------------------------------------------------------------------


class CharLM(nn.Module):
    """A small causal transformer over characters: embeddings, two encoder layers, a head.

    Args:
        vocab_size: how many characters it predicts.
        width: embedding width.
        layers: how many ``nn.TransformerEncoderLayer`` blocks.
        heads: attention heads per block.
        dropout: dropout inside the blocks (the demo's RNG state matters because of it).
    """

    causal_mask: torch.Tensor

    def __init__(
        self,
        vocab_size: int,
        *,
        width: int = 48,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(BLOCK_SIZE, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=2 * width, dropout=dropout,
                batch_first=True, norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        # Not persistent: it is a function of BLOCK_SIZE, not something training changes.
        mask = nn.Transformer.generate_square_subsequent_mask(BLOCK_SIZE)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the next character at every position: (batch, time, vocab)."""
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        mask = self.causal_mask[:length, :length]
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits


def build_model(corpus: Corpus | None = None) -> CharLM:
    """A fresh demo model (random weights): the architecture every demo checkpoint holds.

    Example:
        >>> model = build_model()
        >>> ckpts.load_weights("demo-run/step-00000210", model)  # doctest: +SKIP
    """
    return CharLM((corpus or make_corpus()).vocab_size)


def generate(model: CharLM, corpus: Corpus, prompt: str, *, length: int) -> str:
    """Greedy continuation of ``prompt`` by ``length`` characters (deterministic)."""
    model.eval()
    tokens = corpus.encode(prompt).tolist()
    with torch.no_grad():
        for _ in range(length):
            context = torch.tensor([tokens[-BLOCK_SIZE:]], dtype=torch.int64)
            tokens.append(int(model(context)[0, -1].argmax()))
    return corpus.decode(tokens)


# --- training -----------------------------------------------------------------------


@dataclass(frozen=True)
class Resumed:
    """The worker started at ``step`` (0: from scratch, else the checkpoint it restored)."""

    step: int


@dataclass(frozen=True)
class StepDone:
    """One optimizer step finished."""

    step: int
    train_loss: float


@dataclass(frozen=True)
class Saved:
    """A checkpoint of ``step`` was committed."""

    step: int
    epoch: int
    train_loss: float
    val_loss: float


TrainEvent = Resumed | StepDone | Saved


def warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over WARMUP_STEPS, then cosine decay to 10%."""

    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = min(1.0, (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; later runs get these generators from checkpoints."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(run_dir: Path, *, steps: int) -> Iterator[TrainEvent]:
    """Train the demo model in ``run_dir`` up to ``steps``, resuming from its newest checkpoint.

    Two runs of the same ``steps`` produce identical losses and weights however often
    they are interrupted, given the same torch build and thread count (the CPU
    kernels used here are deterministic; ``torch.use_deterministic_algorithms`` is
    not called because it imports torch's compiler stack, seconds per worker).

    Every EVAL_EVERY steps (and at the last one) it computes the validation loss
    and offers a checkpoint to the manager, which writes it when val_loss beats the
    best so far or the step is a multiple of SAVE_EVERY; the last step is always
    written. Retention then keeps the BEST_KEPT best by val_loss and the newest.
    An interrupted run writes the same checkpoints as an uninterrupted one:
    OnImprovement compares with the checkpoints on disk, and the best val_loss so
    far is always among the kept ones.

    Yields:
        ``Resumed`` first, then ``StepDone`` per step and ``Saved`` per checkpoint
        written.

    Raises:
        InvalidArgumentError: ``steps`` < 1.
    """
    if steps < 1:
        raise InvalidArgumentError(f"steps must be >= 1, got {steps}")
    seed_everything(SEED)
    corpus = make_corpus()
    train_x, train_y = windows(corpus.encode(corpus.train_text), stride=WINDOW_STRIDE)
    val_x, val_y = windows(corpus.encode(corpus.val_text), stride=BLOCK_SIZE // 2)
    model = build_model(corpus)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    loader = ckpts.ResumableLoader(
        DataLoader(TensorDataset(train_x, train_y), batch_size=BATCH_SIZE, shuffle=True,
                   drop_last=True)
    )
    state = ckpts.TrainState(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)
    # KeepLast(1) (and the manager, which never deletes the newest) keeps the newest
    # checkpoint, so the one a killed worker saved last is there for the next worker.
    # The kill plan relies on that: Every(steps=SAVE_EVERY) saves its checkpoint_step,
    # and no save can come between it and the kill (see plan_kill).
    manager = ckpts.CheckpointManager(
        run_dir,
        save=[ckpts.Every(steps=SAVE_EVERY), ckpts.OnImprovement("val_loss")],
        keep=[ckpts.KeepBest(BEST_KEPT, "val_loss"), ckpts.KeepLast(1)],
    )
    step = manager.restore(state) or 0
    yield Resumed(step)
    losses_since_eval: list[float] = []
    while step < steps:
        for inputs, targets in loader:
            model.train()
            loss = functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            scheduler.step()
            step += 1
            losses_since_eval.append(loss.item())
            yield StepDone(step, losses_since_eval[-1])
            # save() only here: the triggers are evaluated on every call.
            if step % EVAL_EVERY == 0 or step == steps:
                # The mean over the steps since the last evaluation: the same after a
                # resume (checkpoints are only written at evaluations, and a resume
                # redoes exactly the steps since one).
                train_loss = sum(losses_since_eval) / len(losses_since_eval)
                val_loss = evaluate(model, val_x, val_y)
                losses_since_eval.clear()
                checkpoint = manager.save(
                    step, state, metrics={"train_loss": train_loss, "val_loss": val_loss},
                    epoch=loader.epoch, force=step == steps,  # the final weights get compared
                )
                if checkpoint is not None:
                    yield Saved(step, loader.epoch, train_loss, val_loss)
            if step == steps:
                break


def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy on held-out windows (dropout off, no RNG drawn)."""
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
    return functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()


# --- the worker's stdout protocol ---------------------------------------------------


def format_event(event: TrainEvent) -> str:
    """One stdout line; floats as repr so a reader recovers them exactly."""
    if isinstance(event, Resumed):
        return f"resumed from step {event.step}"
    if isinstance(event, StepDone):
        return f"step {event.step} train_loss {event.train_loss!r}"
    return (f"saved step {event.step} epoch {event.epoch} train_loss {event.train_loss!r} "
            f"val_loss {event.val_loss!r}")


_FLOAT = r"(-?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf))"
_PATTERNS: tuple[tuple[re.Pattern[str], Callable[[list[str]], TrainEvent]], ...] = (
    (re.compile(r"^resumed from step (\d+)$"), lambda g: Resumed(int(g[0]))),
    (re.compile(rf"^step (\d+) train_loss {_FLOAT}$"),
     lambda g: StepDone(int(g[0]), float(g[1]))),
    (re.compile(rf"^saved step (\d+) epoch (\d+) train_loss {_FLOAT} val_loss {_FLOAT}$"),
     lambda g: Saved(int(g[0]), int(g[1]), float(g[2]), float(g[3]))),
)


def parse_event(line: str) -> TrainEvent | None:
    """Invert :func:`format_event`; None for any other line (warnings, tracebacks)."""
    for pattern, build in _PATTERNS:
        match = pattern.match(line.strip())
        if match:
            return build(list(match.groups()))
    return None


# --- what the demo checks afterwards ------------------------------------------------


@dataclass(frozen=True)
class KillPlan:
    """Where the demo interrupts its first worker.

    Attributes:
        checkpoint_step: the save the next worker resumes from (mid-epoch, a multiple
            of SAVE_EVERY, so ``Every`` writes it whatever val_loss does).
        kill_step: SIGKILL the worker once it reports this step (mid-epoch, after
            ``checkpoint_step`` and before the next evaluation, hence before any
            other save, so some steps are redone).
    """

    checkpoint_step: int
    kill_step: int


def plan_kill(steps: int) -> KillPlan:
    """Pick the first mid-epoch save past half of ``steps`` and a step a few batches later.

    Raises:
        InvalidArgumentError: ``steps`` is too short to hold such a save and a later step.
    """
    per_epoch = batches_per_epoch()
    for save in range(SAVE_EVERY, steps, SAVE_EVERY):
        if save < steps // 2 or save % per_epoch == 0:
            continue
        kill = save + EVAL_EVERY // 2
        while kill % per_epoch == 0:
            kill += 1
        if kill < min(steps, save + EVAL_EVERY):  # no evaluation, hence no save, between
            return KillPlan(checkpoint_step=save, kill_step=kill)
    raise InvalidArgumentError(
        f"steps={steps} is too short to interrupt the demo between two checkpoints; "
        f"use at least {3 * SAVE_EVERY}"
    )


def differing_weights(first: ckpts.Checkpoint | Path, second: ckpts.Checkpoint | Path
                      ) -> list[str]:
    """Names of the model tensors that are not bit-identical between two demo checkpoints."""
    corpus = make_corpus()
    models = build_model(corpus), build_model(corpus)
    ckpts.load_weights(first, models[0])
    ckpts.load_weights(second, models[1])
    tensors = models[1].state_dict()
    return [name for name, t in models[0].state_dict().items() if not torch.equal(t, tensors[name])]


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point: train RUN_DIR to --steps, printing one line per event."""
    parser = argparse.ArgumentParser(prog="python -m ckpts.cli.demo_training",
                                     description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    # One thread: deterministic reductions, and a core left for the reference run.
    torch.set_num_threads(1)
    for event in train(args.run_dir, steps=args.steps):
        print(format_event(event), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
