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

import torch

import ckpts
from resume_loop_fixed import PrefetchedBatch, TinyLM, train

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
    # the same loop, over this state and retention
    train(ckpts.CheckpointManager(args.out_dir, keep=RETENTION[args.keep]), state, model,
          optimizer, batch)

if __name__ == "__main__":
    main()
