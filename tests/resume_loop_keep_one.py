"""The loop of ``resume_loop_fixed.py`` with nanoGPT's options and retention that keeps one
checkpoint (or the best one and the last): ``ckpts check-resume`` judges it all the same.

Usage: python resume_loop_keep_one.py --out_dir=RUN_DIR [--keep=last|best_and_last]
[--lose_prefetch]

``--keep=last`` keeps the newest checkpoint only (``KeepLast(1)``), ``best_and_last``
the one of lowest ``val_loss`` and the newest; every other checkpoint is deleted at the
next save. The loop resumes exactly either way, unless ``--lose_prefetch`` leaves the
batch drawn before each save out of the state: then the resumed run trains on the
batch drawn before its restore() instead.
"""

from __future__ import annotations

import argparse
import time

import torch

import ckpts
from resume_loop_fixed import (
    EVAL_INTERVAL,
    MAX_ITERS,
    PrefetchedBatch,
    TinyLM,
    estimate_loss,
    get_batch,
    loss_of,
)

RETENTION = {
    "last": [ckpts.KeepLast(1)],
    "best_and_last": [ckpts.KeepBest(1, "val_loss"), ckpts.KeepLast(1)],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--keep", choices=sorted(RETENTION), default="last")
    parser.add_argument("--lose_prefetch", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(1337)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = PrefetchedBatch()
    objects = {"model": model, "optimizer": optimizer} if args.lose_prefetch \
        else {"model": model, "optimizer": optimizer, "batch": batch}
    state = ckpts.TrainState(**objects)
    manager = ckpts.CheckpointManager(args.out_dir, keep=RETENTION[args.keep])
    resumed_at = manager.restore(state)  # no --resume flag: a run resumes when it can
    iter_num = resumed_at or 0

    while True:
        if iter_num % EVAL_INTERVAL == 0 and iter_num != resumed_at:
            val_loss = estimate_loss(model)
            if iter_num > 0:
                manager.save(iter_num, state, metrics={"val_loss": val_loss})
        if iter_num == MAX_ITERS:
            break
        loss = loss_of(model, batch.x, batch.y)
        batch.x, batch.y = get_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iter_num += 1
        time.sleep(0.01)


if __name__ == "__main__":
    main()
