"""Finishing a restore whose tensors the read filled in place (ckpts._checkpoint.restore).

A restore reads every saved tensor straight into the live tensor that takes it, hash
checked, before any ``load_state_dict`` runs. For a torch module or optimizer whose every
tensor was filled that way, torch's ``load_state_dict`` would only copy each tensor onto
itself, at a cost that grows with the state: a module's key scan grows with modules x keys
(8 s for 5,000 small layers), an optimizer copies each of its state tensors once more. The
functions here finish such an object without it, and say False (take torch's path)
whenever anything could behave differently: hooks, classes with their own loading, extra
state, a tensor that was not filled in place. Nothing is cached across calls.
"""

from __future__ import annotations

from typing import Any

import torch

# the exact types of a tensor that is its own memory (subclasses, lazy parameters and
# DTensors take torch's path)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def module_filled_in_place(obj: object, state_dict: Any) -> bool:
    """Whether ``obj``, a torch module, already holds ``state_dict`` because the read
    filled each of its tensors in place: then ``Module.load_state_dict`` is skipped.

    ``load_state_dict`` walks the modules and, for each, scans every key of the state
    for its own prefix (5,000 modules x 10,000 keys: 8 s) only to ``copy_`` each saved
    tensor into the live one. The read hands back, for a filled key, the very tensor the
    module's ``state_dict()`` gave (a detached view of the parameter or buffer), so the
    copy would be of each tensor onto itself. This checks exactly that, with one walk
    over the modules as torch's own (every child under every name it has): every
    persistent parameter and buffer has a saved tensor under its key that is the same
    view of the same memory (storage, offset, shape, strides, dtype, conjugate and
    negative bits), and the state holds no other key. That check costs about 5 ms per
    1,000 tensors.

    Anything else takes torch's path (returns False): an object that is not a module,
    load hooks on any submodule, a submodule class with its own ``load_state_dict``,
    ``_load_from_state_dict`` (BatchNorm's) or extra state, a tensor subclass (lazy
    parameters, DTensor), a saved tensor in memory of its own (another dtype, or not
    filled in place), a missing or extra key, or torch's swap-on-load mode.
    """
    if not isinstance(obj, torch.nn.Module) or not isinstance(state_dict, dict) \
            or torch.__future__.get_swap_module_params_on_conversion():
        return False
    base = torch.nn.Module
    matched = 0
    pending: list[tuple[str, torch.nn.Module]] = [("", obj)]
    while pending:
        prefix, module = pending.pop()
        kind = type(module)
        if kind._load_from_state_dict is not base._load_from_state_dict \
                or kind.load_state_dict is not base.load_state_dict \
                or kind.set_extra_state is not base.set_extra_state \
                or kind.get_extra_state is not base.get_extra_state \
                or module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks:
            return False
        for name, live in module._parameters.items():
            if live is not None:
                if not _same_view(state_dict.get(prefix + name), live):
                    return False
                matched += 1
        skipped = module._non_persistent_buffers_set
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in skipped:
                if not _same_view(state_dict.get(prefix + name), buffer):
                    return False
                matched += 1
        pending += [(f"{prefix}{name}.", child) for name, child in module._modules.items()
                    if child is not None]
    return matched == len(state_dict)


def _same_view(saved: object, live: torch.Tensor) -> bool:
    """Whether ``saved`` shows exactly the memory ``live`` does, as ``live`` does: copying
    one into the other would change nothing. (``is_set_to``: the same storage, offset,
    shape and strides, in one call.)"""
    return isinstance(saved, torch.Tensor) and type(saved) in _PLAIN and type(live) in _PLAIN \
        and saved.layout is torch.strided and live.layout is torch.strided \
        and saved.dtype is live.dtype and saved.is_set_to(live) \
        and saved.is_conj() is live.is_conj() and saved.is_neg() is live.is_neg()


def optimizer_filled_in_place(obj: object, state_dict: Any) -> bool:
    """Finish restoring a torch optimizer whose every state tensor the read has just
    filled in place (the same parameters, keys and tensor objects as saved): only its
    parameter groups come from the checkpoint. ``Optimizer.load_state_dict`` would copy
    each state tensor once more (1 s for 40,000 small ones); here nothing is copied.

    Anything else takes torch's own path (returns False): an optimizer class with its
    own ``load_state_dict``, load hooks, a state entry that is not a tensor or was not
    filled in place, or state for other parameters than were saved.
    """
    if not isinstance(obj, torch.optim.Optimizer) \
            or type(obj).load_state_dict is not torch.optim.Optimizer.load_state_dict \
            or obj._optimizer_load_state_dict_pre_hooks \
            or obj._optimizer_load_state_dict_post_hooks:
        return False
    groups, saved_groups = obj.param_groups, state_dict["param_groups"]
    params = [p for group in groups for p in group["params"]]
    ids = [i for group in saved_groups for i in group["params"]]
    saved_state = state_dict["state"]
    if len(groups) != len(saved_groups) or len(params) != len(ids) \
            or len(obj.state) != len(saved_state):
        return False
    by_id = dict(zip(ids, params, strict=True))
    for saved_id, entry in saved_state.items():
        live = obj.state.get(by_id[saved_id]) if saved_id in by_id else None
        if live is None or live.keys() != entry.keys() \
                or any(value is not live[key] for key, value in entry.items()):
            return False
    restored = []
    for group, saved_group in zip(groups, saved_groups, strict=True):
        new_group = {**saved_group, "params": group["params"]}
        if "param_names" in group and "param_names" not in saved_group:
            new_group["param_names"] = group["param_names"]
        restored.append(new_group)
    obj.__setstate__({"state": obj.state, "param_groups": restored})
    return True
