import subprocess
import sys

import ckpts

PUBLIC = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointError",
    "Every",
    "FormatVersionError",
    "IncompatibleStateError",
    "InsufficientSpaceError",
    "InvalidArgumentError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepSince",
    "KeepWithinBytes",
    "LockedError",
    "NotACheckpointError",
    "OnImprovement",
    "ResumableLoader",
    "ResumeCheckError",
    "RetentionPolicy",
    "SaveTrigger",
    "Stateful",
    "TrainState",
    "UnserializableStateError",
    "WriteError",
    "__version__",
    "import_checkpoints",
    "load_state",
    "load_weights",
    "verify",
]


def test_the_public_names_are_exactly_these() -> None:
    # a new public name is a decision: add it here on purpose
    assert ckpts.__all__ == PUBLIC


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert ckpts.__all__ == sorted(ckpts.__all__)
    assert dir(ckpts) == ckpts.__all__
    for name in ckpts.__all__:
        assert getattr(ckpts, name) is not None, name


def test_every_error_is_a_checkpoint_error() -> None:
    for name in ckpts.__all__:
        obj = getattr(ckpts, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ckpts.CheckpointError)


def test_importing_ckpts_does_not_import_torch() -> None:
    code = "import sys, ckpts, ckpts._format.catalog; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
