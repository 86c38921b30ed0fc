"""Replacing one module's forward on the instance, the way the backend routes `nn.Linear` and `nn.Dropout`.

Why on the instance: the module keeps its type, parameters and state-dict keys (quantization and PEFT look for
the exact type), and a bound method travels with `copy.deepcopy`. Under an accelerate hook, which moved the
module's own forward to `_old_forward`, the forward that hook calls is the one replaced.
"""

from __future__ import annotations

import types
from typing import Callable

from torch import nn


def _forward_attribute(module: nn.Module) -> str:
    return "_old_forward" if hasattr(module, "_hf_hook") else "forward"


def replace_forward(module: nn.Module, forward: Callable | None) -> None:
    """Bind `forward(self, ...)` as this module's forward; None restores its class's own."""
    attribute = _forward_attribute(module)
    if forward is not None:
        setattr(module, attribute, types.MethodType(forward, module))
    elif attribute == "forward":
        module.__dict__.pop("forward", None)
    else:
        module._old_forward = types.MethodType(type(module).forward, module)


def replaced_forward(module: nn.Module) -> Callable | None:
    """The function `replace_forward` bound to this module, None where it runs its class's own forward."""
    return getattr(module.__dict__.get(_forward_attribute(module)), "__func__", None)
