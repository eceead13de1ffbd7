import ckpts


def test_all_is_sorted_and_complete() -> None:
    assert ckpts.__all__ == sorted(ckpts.__all__)
    public = {name for name in dir(ckpts) if not name.startswith("_")} - {"errors"}
    assert public == set(ckpts.__all__) - {"__version__"}


def test_every_error_is_a_checkpoint_error() -> None:
    for name in ckpts.__all__:
        obj = getattr(ckpts, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ckpts.CheckpointError)
