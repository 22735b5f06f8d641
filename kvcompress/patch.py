"""The one place where kvcompress changes a live model: every hook is registered and removed here.

``PatchHandle`` collects undo actions; ``handle.remove()`` (or leaving a ``with`` block) runs them in
reverse order, restoring the model exactly as it was. ``replace_forward`` swaps one module's forward
for another function (e.g. MLA's absorbed attention) on that instance only.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

_MISSING = object()


class PatchHandle:
    """Undo record for changes made to a model; usable as a context manager."""

    def __init__(self, model: torch.nn.Module | None = None, description: str = ""):
        self.model = model
        self.description = description
        self._undo: list[Callable[[], None]] = []
        self.active = True

    def add_undo(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        """Restore everything this handle changed (idempotent)."""
        while self._undo:
            self._undo.pop()()
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({self.description or type(self.model).__name__}, {state})"


def replace_forward(module: torch.nn.Module, forward: Callable, handle: PatchHandle) -> None:
    """Bind ``forward(module, *args, **kwargs)`` as ``module.forward``; ``handle.remove()`` undoes it."""
    previous = module.__dict__.get("forward", _MISSING)
    module.forward = types.MethodType(forward, module)

    def undo() -> None:
        if previous is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous

    handle.add_undo(undo)


def set_attribute(obj: object, name: str, value: object, handle: PatchHandle) -> None:
    """``setattr(obj, name, value)``, restored (or deleted if it was absent) by ``handle.remove()``."""
    previous = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
    setattr(obj, name, value)

    def undo() -> None:
        if previous is _MISSING:
            try:
                delattr(obj, name)
            except AttributeError:
                pass
        else:
            setattr(obj, name, previous)

    handle.add_undo(undo)
