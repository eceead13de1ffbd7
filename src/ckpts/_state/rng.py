"""Capture and restore every random number generator a training loop draws from.

Python's ``random``, numpy's global generator, torch's CPU generator and the
generator of every CUDA device. The state is plain data (tuples, ints, uint8
tensors), so it goes through the same pickle-free codec as everything else.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from ckpts.errors import IncompatibleStateError

log = logging.getLogger("ckpts")


class RNGState:
    """A Stateful view of the process-wide random generators."""

    def state_dict(self) -> dict[str, Any]:
        """Capture python, numpy, torch CPU and (if initialized) all CUDA generators."""
        kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
        if not isinstance(keys, np.ndarray):
            raise TypeError("numpy returned a non-legacy RNG state")
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "torch": torch.get_rng_state(),
        }
        cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        if cuda_in_use:
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put every generator back exactly where :meth:`state_dict` found it."""
        try:
            numpy_state = state["numpy"]
            random.setstate(_as_tuples(state["python"]))
            np.random.set_state((
                numpy_state["kind"],
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            ))
            torch.set_rng_state(state["torch"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError,
                OverflowError) as e:
            raise IncompatibleStateError(f"the saved RNG state is unusable: {e}") from e
        cuda_states = state.get("cuda")
        if cuda_states:
            if not torch.cuda.is_available():
                log.warning(
                    "checkpoint has RNG state for %d CUDA device(s) but CUDA is not available "
                    "here; CUDA randomness will not match the original run", len(cuda_states)
                )
                return
            if len(cuda_states) != torch.cuda.device_count():
                log.warning(
                    "checkpoint has RNG state for %d CUDA device(s), this process sees %d; "
                    "restoring the first %d", len(cuda_states), torch.cuda.device_count(),
                    min(len(cuda_states), torch.cuda.device_count()),
                )
            for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)


def _as_tuples(value: Any) -> Any:
    """random.setstate wants tuples all the way down (lists would be refused)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
