import importlib
import subprocess
import sys

import pytest

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


STORAGE_PUBLIC = [
    "CorruptCheckpointError",
    "FsspecStorage",
    "Listed",
    "LocalStorage",
    "LockedError",
    "MANIFEST",
    "Range",
    "Staged",
    "Storage",
    "as_os_errors",
    "checkpoint_name",
    "coalesce",
    "open_storage",
    "parse_step",
]


def test_the_storage_port_exports_exactly_these_sorted_names() -> None:
    # what a backend may build on (tests/dict_storage.py uses nothing else): a decision
    import ckpts.storage

    assert ckpts.storage.__all__ == STORAGE_PUBLIC
    assert sorted(STORAGE_PUBLIC) == STORAGE_PUBLIC
    for name in STORAGE_PUBLIC:
        assert getattr(ckpts.storage, name) is not None, name
    assert ckpts.storage.LockedError is ckpts.LockedError  # the errors are ckpts' own


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


@pytest.mark.parametrize(("name", "namespace"), [
    ("Storage", "ckpts.storage"), ("LocalStorage", "ckpts.storage"),
    ("FsspecStorage", "ckpts.storage"), ("check_resume", "ckpts.testing"),
    ("ResumeCheck", "ckpts.testing"),
])
def test_names_that_moved_still_import_from_ckpts_with_a_warning(name: str,
                                                                 namespace: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"moved to {namespace}.{name}"):
        moved = getattr(ckpts, name)
    assert moved is getattr(importlib.import_module(namespace), name)
    assert name not in ckpts.__all__


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        ckpts.Nope  # noqa: B018
