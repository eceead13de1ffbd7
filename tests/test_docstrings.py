"""Every docstring example that is not marked ``+SKIP`` runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import ckpts

MODULES = sorted(m.name for m in pkgutil.walk_packages(ckpts.__path__, "ckpts."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"ckpts": ckpts, "torch": torch},
                             optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_some_examples_do_run() -> None:
    attempted = sum(doctest.testmod(importlib.import_module(name), report=False,
                                    extraglobs={"ckpts": ckpts, "torch": torch}).attempted
                    for name in MODULES)
    assert attempted >= 30
