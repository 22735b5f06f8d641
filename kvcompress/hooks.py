"""Every change kvcompress makes to a live model goes through this module, and is undone by it.

A :class:`PatchHandle` collects undo actions; ``handle.remove()`` (or leaving a ``with`` block) runs them
in reverse order, restoring the model exactly as it was. The primitives below are the only ways the
methods touch a model or transformers' global tables:

* :func:`replace_forward` -- a module's ``forward`` replaced by another function (MLA's and TPLA's
  attention) on that instance only;
* :func:`wrap_forward` -- a module's ``forward`` wrapped by a function that receives the original
  (the wrapper runs its clean-up in ``try/finally``, so it also runs after ``KeyboardInterrupt``, which
  torch's ``always_call`` forward hooks do not see);
* :func:`set_attribute` -- an attribute set, restored or deleted on removal;
* :func:`register_attention` -- a named attention function (and the mask function of the implementation
  it stands in for) registered in transformers' ``AttentionInterface``/``AttentionMaskInterface``, and
  unregistered when the last handle using the name is removed;
* :func:`set_attention_implementation` -- ``model.set_attn_implementation(name)``, with the previous
  implementation restored on removal.

This module imports nothing else from kvcompress, so every method module can use it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

_MISSING = object()


class PatchHandle:
    """Undo record for changes made to a model; usable as a context manager.

    Args:
        model: the model the changes apply to (for ``repr`` and for callers that need it).
        description: one line saying what was changed, shown by ``repr``.
    """

    def __init__(self, model: torch.nn.Module | None = None, description: str = ""):
        self.model = model
        self.description = description
        self._undo: list[Callable[[], None]] = []
        self.active = True
        # filled by kvcompress.patch.patch_model:
        self.method: Any = None  # the kvcompress.registry.Method in use
        self.params: dict[str, Any] = {}
        self.last_cache: Any = None  # the cache of the newest patched generate() call
        self.caches_made = 0  # how many generate() calls ran with a cache of this method

    def add_undo(self, undo: Callable[[], None]) -> None:
        """Run ``undo()`` when this handle is removed (actions run newest first)."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Restore everything this handle changed (idempotent)."""
        while self._undo:
            self._undo.pop()()
        self.active = False
        self.last_cache = None

    def __deepcopy__(self, memo) -> "PatchHandle":
        # A copy would undo changes on the original model, and a deep-copied patched model would keep
        # reporting to this handle: refuse instead of copying something that cannot be right.
        raise TypeError(
            f"{self!r} cannot be copied: copy.deepcopy a model before patching it or after handle.remove(), "
            "then patch the copy"
        )

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({self.description or type(self.model).__name__}, {state})"


def undo_on_failure(handle: PatchHandle) -> "_UndoOnFailure":
    """``with undo_on_failure(handle): ...`` removes ``handle`` if the block raises anything (also
    ``KeyboardInterrupt``), so a patch is either wholly applied or not at all."""
    return _UndoOnFailure(handle)


class _UndoOnFailure:
    def __init__(self, handle: PatchHandle):
        self.handle = handle

    def __enter__(self) -> PatchHandle:
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.handle.remove()
        return False


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


def replace_forward(module: torch.nn.Module, forward: Callable, handle: PatchHandle) -> None:
    """Bind ``forward(module, *args, **kwargs)`` as ``module.forward``; ``handle.remove()`` undoes it."""
    set_attribute(module, "forward", types.MethodType(forward, module), handle)


def wrap_forward(module: torch.nn.Module, wrapper: Callable, handle: PatchHandle) -> None:
    """Make ``module.forward(*args, **kwargs)`` call ``wrapper(module, original, *args, **kwargs)``, where
    ``original`` is the forward the module had (bound); ``handle.remove()`` undoes it.

    Hooks registered with ``register_forward_hook`` still run around the wrapper, as around any forward.
    """
    original = module.forward

    def forward(self, *args, **kwargs):
        return wrapper(self, original, *args, **kwargs)

    replace_forward(module, forward, handle)


def add_hook(removable: Any, handle: PatchHandle) -> None:
    """Record a torch hook handle (``module.register_forward_hook(...)``'s result) for removal."""
    handle.add_undo(removable.remove)


# Names registered in transformers' attention tables and how many active handles use each: the tables
# are global (one per process), so a name stays while any patched model uses it.
_ATTENTION_USERS: dict[str, int] = {}


def register_attention(name: str, function: Callable, mask_like: str, handle: PatchHandle) -> None:
    """Register ``function`` as attention implementation ``name`` in transformers' ``AttentionInterface``,
    with the mask function of implementation ``mask_like`` (e.g. ``"sdpa"``), until the last handle that
    registered ``name`` is removed."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mask = ALL_MASK_ATTENTION_FUNCTIONS[mask_like]  # raises KeyError for an unknown implementation first
    ALL_ATTENTION_FUNCTIONS.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    _ATTENTION_USERS[name] = _ATTENTION_USERS.get(name, 0) + 1

    def undo() -> None:
        _ATTENTION_USERS[name] -= 1
        if _ATTENTION_USERS[name] == 0:
            del _ATTENTION_USERS[name]
            type(ALL_ATTENTION_FUNCTIONS)._global_mapping.pop(name, None)
            type(ALL_MASK_ATTENTION_FUNCTIONS)._global_mapping.pop(name, None)

    handle.add_undo(undo)


def set_attention_implementation(model: torch.nn.Module, name: str, handle: PatchHandle) -> None:
    """``model.set_attn_implementation(name)``; ``handle.remove()`` restores the previous implementation.

    Raises:
        RuntimeError: transformers did not take the implementation (nothing is left changed).
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    handle.add_undo(lambda: model.set_attn_implementation(previous))
    if model.config._attn_implementation != name:
        raise RuntimeError(f"transformers refused attention implementation {name!r} for {type(model).__name__}")
