"""Hugging Face Trainer integration: :class:`CkptsCallback` makes Trainer's saves ckpts checkpoints.

Usage (a one-minute change to a Trainer script)::

    from ckpts.integrations.transformers import CkptsCallback

    callback = CkptsCallback("runs/exp", keep=[ckpts.KeepBest(3, "eval_loss"), ckpts.KeepLast(1)])
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.resume_path())   # None on a fresh run

How it works (read from, and tested with, transformers 4.57.6 and 5.24.0):

* **When it saves.** Trainer decides, from ``save_strategy``/``save_steps``: its
  ``DefaultFlowCallback`` sets ``control.should_save`` in ``on_step_end`` (or
  ``on_epoch_end``). This callback clears the flag, so Trainer writes nothing
  (no ``optimizer.pt``, ``rng_state.pth``, ``training_args.bin``, nothing in
  ``output_dir``), and saves a ckpts checkpoint instead at the point where Trainer
  itself would have saved: after that step's log and evaluation, which is the last
  of ``on_step_end``/``on_log``/``on_evaluate`` that Trainer calls for the step. The
  evaluation (it draws from the torch RNG when it creates its loader) is thus inside
  the saved RNG state, as in Trainer's own checkpoints.
* **What it saves.** One atomic, hashed, pickle-free checkpoint ``RUN/step-%08d``:
  ``model`` (``model.safetensors``, Hugging Face names), ``optimizer``,
  ``scheduler``, the grad ``scaler`` when there is one, every RNG, and
  ``trainer_state``: Trainer's ``TrainerState`` as JSON data in the manifest (the
  data position is its ``global_step``; see below). With ``save_only_model`` only
  the model and the Trainer state. The eval metrics of the step and the step's
  training log (``loss``, ``learning_rate``, ``grad_norm``) go on the checkpoint;
  an evaluation that comes after the save at the same step (``eval_strategy="epoch"``
  with step saves, or ``trainer.evaluate()`` after training) is attached with
  ``add_metrics``.
* **Resuming.** ``train(resume_from_checkpoint=PATH)`` needs a folder with
  ``trainer_state.json`` and the model weights; a committed ckpts checkpoint may
  hold no file outside its manifest, so :meth:`CkptsCallback.resume_path` writes a
  small *resume view*, ``RUN/.hf-resume/``, through the storage port
  (``Storage.export``): ``trainer_state.json`` rebuilt from the manifest and hard links
  to the checkpoint's model files (no pickle; a copy only where the filesystem has no
  hard links). The view is a folder Trainer opens, inside the run, so the callback
  takes local runs only (a URL run is refused when the callback is built; for one,
  ``export`` would download the weights into a local folder). It picks the newest
  checkpoint that passes :func:`ckpts.verify` (a full read). From
  the view Trainer takes the step, epoch and skipped batches (accelerate's
  ``skip_first_batches``, so no data is loaded to skip) and loads the weights.
  Trainer finds no optimizer, scheduler or RNG pickles there, so it loads none; in
  ``on_train_begin`` this callback restores the whole checkpoint of Trainer's
  ``global_step`` (hash-checked, so the weights are read once more) into the model,
  optimizer, scheduler and scaler, and puts the saved RNG state back exactly where
  Trainer would call ``_load_rng_state``: at ``on_epoch_begin`` when the checkpoint
  ends an epoch, else at the first ``on_step_begin`` (after the first batch of the
  resumed epoch is drawn), logging which generators it restored from which
  checkpoint. Until then a filter on the ``transformers.trainer`` logger drops
  Trainer's "Didn't find an RNG file ... reproducibility is not guaranteed" (false
  here), and only that. Newer checkpoints that ``resume_path`` skipped as damaged are
  deleted once the next save is committed (``restore(discard_newer=True)``). A run
  that starts at step 0 in a directory that holds checkpoints is refused, and so is
  resuming from a ``save_only_model`` checkpoint (no optimizer state). The view is
  removed at the end of training.
* **Trainer settings.** Without ``keep=``, ``save_total_limit`` keeps that many
  checkpoints, always including the newest and, when ``metric_for_best_model`` is
  set, the best one (Trainer's rotation); without a limit every checkpoint is kept.
  ``load_best_model_at_end`` loads, at ``on_train_end``, the saved checkpoint with
  the best ``metric_for_best_model`` (``greater_is_better`` decides the direction;
  ties go to the earlier step, as Trainer's strict comparison does). This is
  Trainer's pick whenever evaluations fall on save steps; when ``eval_steps`` is a
  smaller divisor of ``save_steps``, it is the best *saved* checkpoint (Trainer may
  then load none). The Trainer state saved with a checkpoint carries that step's
  ``best_metric`` update, which Trainer makes right after ``on_evaluate``. Trainer's
  extra clean-up for ``save_total_limit=1`` at the end of training is not copied.

Not supported (refused with an error when Trainer is built): ``save_strategy="best"``
(Trainer decides that save after every callback has run, so only its own writer
could take it; use ``"steps"`` with ``ckpts.KeepBest``) and more than one process
(``world_size > 1``). States of other ``ExportableState`` callbacks (e.g.
``EarlyStoppingCallback``) are recorded as they were when training began.

Trainer internals this relies on: the order of callbacks around a save, the
resume steps above, ``TrainerState``'s dataclass fields, and accelerate's
``AcceleratedOptimizer.scaler``. The ``hf`` extra pins the tested versions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckpts.integrations.transformers needs transformers and accelerate; "
        "install them with: pip install 'ckpts[hf]'"
    ) from e

from ckpts._checkpoint.verify import verify_checkpoint
from ckpts._checkpoint.weights import load_weights
from ckpts._format.catalog import Checkpoint
from ckpts._format.codec import decode
from ckpts._format.index import read_manifest
from ckpts._run.manager import CheckpointManager
from ckpts._run.policy import Mode, RetentionPolicy, rank_by
from ckpts._state.rng import RNGState
from ckpts._state.train_state import Stateful, TrainState
from ckpts.errors import (
    CorruptCheckpointError,
    IncompatibleStateError,
    InvalidArgumentError,
    NotACheckpointError,
    UnserializableStateError,
)
from ckpts.storage import checkpoint_name, open_storage
from ckpts.storage._port import url_protocol

log = logging.getLogger("ckpts")

TRAINER_STATE = "trainer_state"
RESUME_VIEW = ".hf-resume"
TRAINER_STATE_FILE = "trainer_state.json"
TRAIN_LOG_KEYS = ("loss", "learning_rate", "grad_norm")
TRAINER_LOGGER = "transformers.trainer"


class CkptsCallback(TrainerCallback):
    """A Trainer callback that saves Trainer's checkpoints with ckpts and resumes them exactly.

    Trainer's ``save_strategy``/``save_steps`` decide when to save; each save becomes
    an atomic, hash-verified, pickle-free ckpts checkpoint of the complete training
    state in ``directory``, and Trainer itself writes no checkpoint. See the module
    docstring for how saving and resuming fit into Trainer.

    Args:
        directory: the run directory (``RUN/step-00000500/`` per checkpoint).
        keep: retention policies, as for :class:`ckpts.CheckpointManager`. ``None``:
            follow ``save_total_limit`` (and protect the best checkpoint when
            ``metric_for_best_model`` is set), or keep everything without a limit.
        async_save: write checkpoints in the background (the training step waits
            only for the copy to host memory); training end waits until the last one
            is durable.
        max_shard_size: split each object's tensors into files of at most this size.

    Attributes:
        manager: the :class:`ckpts.CheckpointManager` of the run (``best()``,
            ``checkpoints()``, ``add_metrics()``...).

    Example:
        >>> callback = CkptsCallback("runs/exp", keep=[ckpts.KeepLast(2)])   # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=train,
        ...                   callbacks=[callback])                          # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=callback.resume_path())     # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: Sequence[RetentionPolicy] | None = None,
        async_save: bool = False,
        max_shard_size: int | str = "512MB",
    ) -> None:
        if url_protocol(directory) is not None:
            raise InvalidArgumentError(
                f"CkptsCallback needs a local run directory, got {directory!r}: Trainer resumes "
                "from a local folder. Save to a local directory (and copy it to the store), or "
                "use ckpts.CheckpointManager with the URL in a plain training loop"
            )
        self.manager = CheckpointManager(directory, keep=keep, async_save=async_save,
                                         max_shard_size=max_shard_size)
        self._keep_given = keep is not None
        self._save_pending = False
        self._train_log: tuple[int, dict[str, float]] | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._rng_at_epoch_begin = False
        self._restored_from: Path | None = None
        self._rng_note_filter: _NoRNGFileNote | None = None

    def __repr__(self) -> str:
        return f"CkptsCallback({str(self.manager.directory)!r}, keep={self.manager.keep!r})"

    def resume_path(self) -> str | None:
        """The folder to pass to ``trainer.train(resume_from_checkpoint=...)``, or None.

        It describes the newest checkpoint of the run that passes verification (a
        damaged newer one is skipped with a warning): ``RUN/.hf-resume/`` holds the
        ``trainer_state.json`` Trainer reads and links to the checkpoint's model
        files. The rest of the state is restored by this callback when training
        begins.

        Returns:
            The resume folder, or None when the run has no checkpoint (a fresh run).

        Raises:
            CorruptCheckpointError: every checkpoint of the run fails verification.
            IncompatibleStateError: the newest intact checkpoint was not written by
                this callback (it has no Trainer state).
        """
        self.manager.wait()
        checkpoints = self.manager.checkpoints()
        for checkpoint in reversed(checkpoints):
            problems = verify_checkpoint(self.manager.storage, checkpoint.name)
            if problems:
                log.warning("not resuming from %s, it fails verification: %s", checkpoint.path,
                            "; ".join(problems))
                continue
            return str(self._write_resume_view(checkpoint))
        if checkpoints:
            raise CorruptCheckpointError(
                f"every checkpoint in {self.manager.directory} fails verification, so there is "
                f"nothing to resume from; run `ckpts verify {self.manager.directory}` for details, "
                "or start over in a new directory"
            )
        return None

    def _write_resume_view(self, checkpoint: Checkpoint) -> Path:
        manifest = read_manifest(self.manager.storage, checkpoint.name)
        saved = manifest["objects"].get(TRAINER_STATE)
        if saved is None:
            raise IncompatibleStateError(
                f"{checkpoint.path} has no {TRAINER_STATE!r} object, so it was not written by "
                "CkptsCallback and Trainer cannot resume from it; load its weights with "
                "ckpts.load_weights() and start a new run in another directory"
            )
        trainer_state = decode(saved["tree"], _no_tensor(Path(checkpoint.path)))
        self._remove_resume_view()  # an earlier resume's
        model_files = [name for name in manifest["files"]
                       if name == "model.safetensors.index.json"
                       or (name.startswith("model") and name.endswith(".safetensors"))]
        state_json = json.dumps(trainer_state, indent=2, sort_keys=True) + "\n"
        view = self.manager.storage.export(
            checkpoint.name, model_files, Path(self.manager.directory) / RESUME_VIEW,
            extra={TRAINER_STATE_FILE: state_json.encode("utf-8")})
        log.info("resume view of step %d written to %s", checkpoint.step, view)
        return view

    def _remove_resume_view(self) -> None:
        """Delete ``RUN/.hf-resume/`` (a folder of its own: only its links and files go)."""
        open_storage(Path(self.manager.directory) / RESUME_VIEW).destroy()

    # ---- Trainer events -------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        """Refuse settings this callback cannot honour; derive retention from Trainer's."""
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best":
            raise InvalidArgumentError(
                "CkptsCallback cannot take save_strategy='best': Trainer makes that save "
                "after every callback has run. Use save_strategy='steps' (with eval_strategy "
                "'steps') and keep=[ckpts.KeepBest(n, 'eval_loss')] instead"
            )
        if args.world_size > 1:
            raise InvalidArgumentError(
                f"CkptsCallback supports one training process; this run has world_size "
                f"{args.world_size}. Train on one process, or checkpoint distributed runs "
                "with ckpts.CheckpointManager directly"
            )
        if not self._keep_given:
            self.manager.keep = trainer_retention(args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        """On resume, restore the checkpoint of Trainer's step (RNG put back later)."""
        if state.global_step == 0:
            latest = self.manager.latest()
            if latest is not None:
                raise InvalidArgumentError(
                    f"training starts at step 0 but {self.manager.directory} already holds "
                    f"checkpoints up to step {latest.step}; resume with "
                    "trainer.train(resume_from_checkpoint=callback.resume_path()), or use a "
                    "new directory"
                )
            return
        step = state.global_step
        if step not in {c.step for c in self.manager.checkpoints()}:
            raise NotACheckpointError(
                f"Trainer resumes at step {step}, but {self.manager.directory} has no "
                f"checkpoint of that step; pass resume_from_checkpoint=callback.resume_path() "
                "to train()"
            )
        manifest = read_manifest(self.manager.storage, checkpoint_name(step))
        saved_objects = set(manifest["objects"])
        objects = self._objects(args, kwargs, _RestoredTrainerState(state))
        if "optimizer" in objects and "optimizer" not in saved_objects:
            raise IncompatibleStateError(
                f"step {step} in {self.manager.directory} holds only {sorted(saved_objects)} "
                "(saved with save_only_model=True), so training cannot resume exactly from "
                "it. Start a new run from its weights with ckpts.load_weights()"
            )
        # Newer checkpoints can only be ones resume_path() skipped as damaged: branch
        # from this step, so that they go once the next save is committed.
        self.manager.restore(TrainState(**objects), step=step, discard_newer=True)
        # Trainer would put the RNGs back later (after building the data iterator), so
        # keep the restored state and set it again at that point.
        self._rng_to_restore = RNGState().state_dict()
        self._rng_at_epoch_begin = bool(args.ignore_data_skip) or float(state.epoch).is_integer()
        self._restored_from = Path(self.manager.directory) / checkpoint_name(step)
        self._rng_note_filter = _NoRNGFileNote()
        logging.getLogger(TRAINER_LOGGER).addFilter(self._rng_note_filter)
        log.info("resumed Trainer at step %d from %s: restored %s (the random generators "
                 "follow)", step, self._restored_from, ", ".join(sorted(objects)))

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        """Put the RNGs back when the resumed checkpoint ended an epoch."""
        self._save_if_pending(args, state, control, kwargs, None)
        if self._rng_to_restore is not None and self._rng_at_epoch_begin:
            self._put_rng_back()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        """Put the RNGs back before the first forward pass of a mid-epoch resume."""
        self._save_if_pending(args, state, control, kwargs, None)
        if self._rng_to_restore is not None and not self._rng_at_epoch_begin:
            self._put_rng_back()
        self._stop_filtering_rng_note()  # Trainer has loaded (or not) its rng_state.pth by now

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        """Take over the save Trainer is about to make."""
        self._take_over_save(args, state, control, kwargs)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        """Take over an epoch-end save."""
        self._take_over_save(args, state, control, kwargs)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Remember the step's training log; save now unless an evaluation follows."""
        if logs and "loss" in logs:
            self._train_log = (state.global_step,
                               _numbers({k: logs[k] for k in TRAIN_LOG_KEYS if k in logs}))
        if not control.should_evaluate:
            self._save_if_pending(args, state, control, kwargs, None)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Save with the eval metrics, or attach them to this step's checkpoint."""
        if self._save_pending:
            self._save_if_pending(args, state, control, kwargs, metrics)
            return
        numbers = _numbers(metrics or {})
        if numbers and state.global_step in {c.step for c in self.manager.checkpoints()}:
            self.manager.add_metrics(state.global_step, numbers)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        """Make the last save durable; load the best checkpoint if asked."""
        self._save_if_pending(args, state, control, kwargs, None)
        self._stop_filtering_rng_note()
        self.manager.close()
        self._remove_resume_view()
        if args.load_best_model_at_end and args.metric_for_best_model:
            metric, mode = best_metric(args)
            best = self.manager.best(metric, mode)
            if best is None:
                log.warning("load_best_model_at_end: no checkpoint in %s has %r; keeping the "
                            "final weights", self.manager.directory, metric)
                return
            load_weights(best, kwargs["model"])
            state.best_model_checkpoint = str(best.path)
            log.info("loaded the best checkpoint, step %d (%s = %s)", best.step, metric,
                     best.metrics[metric])

    # ---- saving ---------------------------------------------------------------------

    def _take_over_save(self, args: TrainingArguments, state: TrainerState,
                        control: TrainerControl, kwargs: dict[str, Any]) -> None:
        if not control.should_save:
            return
        control.should_save = False  # Trainer writes nothing; ckpts saves instead
        self._save_pending = True
        if not (control.should_log or control.should_evaluate):
            self._save_if_pending(args, state, control, kwargs, None)

    def _save_if_pending(self, args: TrainingArguments, state: TrainerState,
                         control: TrainerControl, kwargs: dict[str, Any],
                         eval_metrics: Mapping[str, Any] | None) -> None:
        if not self._save_pending:
            return
        self._save_pending = False
        step = state.global_step
        metrics = dict(self._train_log[1]) if self._train_log and self._train_log[0] == step \
            else {}
        metrics.update(_numbers(eval_metrics or {}))
        record = _SavedTrainerState(trainer_state_data(state, control, args, eval_metrics))
        self.manager.save(step, TrainState(**self._objects(args, kwargs, record)),
                          metrics=metrics, epoch=int(state.epoch or 0))

    def _objects(self, args: TrainingArguments, kwargs: Mapping[str, Any],
                 trainer_state: Stateful) -> dict[str, Stateful]:
        """The objects of a checkpoint, by name (the callback kwargs Trainer passes)."""
        objects: dict[str, Stateful] = {"model": kwargs["model"]}
        if not args.save_only_model:
            objects["optimizer"] = kwargs["optimizer"]
            objects["scheduler"] = kwargs["lr_scheduler"]
            # accelerate's optimizer wrapper holds the GradScaler of fp16 training
            scaler = getattr(kwargs["optimizer"], "scaler", None)
            if scaler is not None:
                objects["scaler"] = scaler
        objects[TRAINER_STATE] = trainer_state
        return objects

    def _put_rng_back(self) -> None:
        if self._rng_to_restore is not None:
            RNGState().load_state_dict(self._rng_to_restore)
            log.info("restored the %s random generators saved in %s (ckpts keeps them in the "
                     "checkpoint, not in an rng_state.pth)", _generator_names(self._rng_to_restore),
                     self._restored_from)
            self._rng_to_restore = None

    def _stop_filtering_rng_note(self) -> None:
        if self._rng_note_filter is not None:
            logging.getLogger(TRAINER_LOGGER).removeFilter(self._rng_note_filter)
            self._rng_note_filter = None


class _NoRNGFileNote(logging.Filter):
    """Drops Trainer's "Didn't find an RNG file ... reproducibility is not guaranteed",
    false while CkptsCallback restores the generators (it logs what it restored)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Didn't find an RNG file")  # an f-string there


def _generator_names(rng: Mapping[str, Any]) -> str:
    """The generators an RNG state holds: ``python, numpy, torch CPU, CUDA (2 devices)``."""
    names = [{"torch": "torch CPU"}.get(name, name) for name in rng if name != "cuda"]
    cuda = [f"CUDA ({len(rng['cuda'])} devices)"] if rng.get("cuda") else []
    return ", ".join(names + cuda)


# ---- Trainer state as data -----------------------------------------------------------


class _SavedTrainerState:
    """The Trainer state of a save, as a Stateful object (JSON data only)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def state_dict(self) -> dict[str, Any]:
        return self.data

    def load_state_dict(self, state_dict: Any, /) -> None:  # pragma: no cover - save only
        self.data = state_dict


class _RestoredTrainerState:
    """Restore-side stand-in: Trainer already read this state from the resume view, so it
    only checks that the checkpoint is the one Trainer resumed from."""

    def __init__(self, live: TrainerState) -> None:
        self.live = live

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Any, /) -> None:
        saved_step = state_dict.get("global_step") if isinstance(state_dict, dict) else None
        if saved_step != self.live.global_step:
            raise IncompatibleStateError(
                f"the checkpoint's Trainer state is at step {saved_step}, Trainer resumed at "
                f"step {self.live.global_step}; pass resume_from_checkpoint="
                "callback.resume_path() to train()"
            )


def trainer_state_data(state: TrainerState, control: TrainerControl, args: TrainingArguments,
                       eval_metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """``TrainerState`` as plain JSON data, as Trainer would write it at this save.

    Trainer records the ``TrainerControl`` state and, right after ``on_evaluate``,
    updates ``best_metric``/``best_global_step``; both are applied to the copy here.

    Raises:
        UnserializableStateError: a value has no JSON form; the message names its key.
    """
    data: dict[str, Any] = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    plain: dict[str, Any] = _plain_json(data, "")
    callbacks = plain.get("stateful_callbacks")
    if isinstance(callbacks, dict) and "TrainerControl" in callbacks:
        callbacks["TrainerControl"] = _plain_json(control.state(), "stateful_callbacks")
    metric_name = args.metric_for_best_model
    if metric_name and eval_metrics:
        name = metric_name if metric_name.startswith("eval_") else f"eval_{metric_name}"
        value = _numbers({name: eval_metrics.get(name)}).get(name)
        if value is not None:
            best = plain.get("best_metric")
            if best is None:
                best = -math.inf if args.greater_is_better else math.inf
            if (value > best) if args.greater_is_better else (value < best):
                plain["best_metric"] = value
                plain["best_global_step"] = state.global_step
    return plain


def _plain_json(value: Any, key: str) -> Any:
    """Copy ``value`` as the JSON types Trainer's own ``trainer_state.json`` would hold."""
    if value is None or type(value) in (bool, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        copy = {}
        for k, v in value.items():
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                k = str(int(k))  # as json.dumps writes an int key
            if not isinstance(k, str):
                raise UnserializableStateError(
                    f"cannot checkpoint the Trainer state: key {k!r} under {key or '<root>'!r} "
                    f"is a {type(k).__qualname__}; Trainer state keys must be str"
                )
            copy[str(k)] = _plain_json(v, f"{key}.{k}" if key else str(k))
        return copy
    if isinstance(value, (list, tuple)):
        return [_plain_json(v, f"{key}.{i}") for i, v in enumerate(value)]
    raise UnserializableStateError(
        f"cannot checkpoint the Trainer state: {key!r} holds a {type(value).__qualname__}, "
        "which has no JSON form (Trainer's own trainer_state.json could not hold it either). "
        "Convert it where it is produced (compute_metrics, a callback, a log call) to a "
        "number, str, list or dict"
    )


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics/log dict, as floats (others are left out)."""
    numbers = {}
    for name, value in values.items():
        if isinstance(value, (int, float, np.integer, np.floating)) \
                and not isinstance(value, (bool, np.bool_)):
            numbers[name] = float(value)
    return numbers


# ---- Trainer settings ------------------------------------------------------------------


def best_metric(args: TrainingArguments) -> tuple[str, Mode]:
    """The checkpoint metric and direction Trainer's ``metric_for_best_model`` names."""
    name = str(args.metric_for_best_model)
    return (name if name.startswith("eval_") else f"eval_{name}",
            "max" if args.greater_is_better else "min")


@dataclasses.dataclass(frozen=True)
class SaveTotalLimit:
    """Trainer's ``save_total_limit`` rotation as a retention policy.

    Keeps the newest checkpoint and the best one by ``metric`` (if given), then the
    most recent others up to ``limit`` in all.
    """

    limit: int
    metric: str | None = None
    mode: Mode = "min"

    def keeps(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The steps Trainer's rotation would keep."""
        kept = {checkpoints[-1].step} if checkpoints else set()
        if self.metric is not None:
            ranked = rank_by(checkpoints, self.metric, self.mode)
            if ranked:
                kept.add(ranked[0].step)
        for checkpoint in reversed(checkpoints):
            if len(kept) >= self.limit:
                break
            kept.add(checkpoint.step)
        return kept


def trainer_retention(args: TrainingArguments) -> list[RetentionPolicy] | None:
    """Retention equivalent to ``save_total_limit`` (None: keep every checkpoint)."""
    limit = args.save_total_limit
    if limit is None or limit <= 0:
        return None
    if not args.metric_for_best_model:
        return [SaveTotalLimit(int(limit))]
    metric, mode = best_metric(args)
    return [SaveTotalLimit(int(limit), metric, mode)]


def _no_tensor(path: Path) -> Any:
    def refuse(key: str) -> Any:
        raise CorruptCheckpointError(
            f"{path}: the Trainer state refers to tensor {key!r}; it should be JSON only, "
            "so the manifest is damaged")
    return refuse
