"""The one place where kvcompress changes a live model: every hook is registered and removed here.

``PatchHandle`` collects undo actions; ``handle.remove()`` (or leaving a ``with`` block) runs them in
reverse order, restoring the model exactly as it was. ``replace_forward`` swaps one module's forward
for another function (e.g. MLA's absorbed attention) on that instance only.

``patch_model(model, method, **params)`` makes every later ``model.generate(...)`` on that instance,
including the calls a ``transformers.pipeline`` makes, run with a fresh cache of ``method``; methods that
need another attention forward install it here too (their ``install`` step). Rules, documented in
docs/registry.md:

* a fresh cache per ``generate`` call; the newest one is kept on ``handle.last_cache`` until the next call
  or ``remove()`` (to read its ``nbytes()``);
* the caller's own choices win: a cache passed as ``cache=`` / ``past_key_values=``, ``use_cache=False``,
  or a ``cache_implementation`` set on the call or the generation config: that call runs exactly as
  unpatched, with a note on the ``kvcompress.patch`` logger (INFO);
* ``cache=`` works on every supported transformers: where ``generate`` predates it, it is passed on as
  ``past_key_values=``;
* patching a model that is already patched raises ``ValueError`` naming the active handle;
* patching a model whose ``config.model_type`` the method does not support raises ``ValueError`` naming
  it and the supported types; every check runs before the model is touched.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.utils import ALL_CACHE_NAMES

if TYPE_CHECKING:  # registry.py imports method modules, which import this one: import it where used
    from .registry import Method

logger = logging.getLogger(__name__)

_MISSING = object()


class PatchHandle:
    """Undo record for changes made to a model; usable as a context manager."""

    def __init__(self, model: torch.nn.Module | None = None, description: str = ""):
        self.model = model
        self.description = description
        self._undo: list[Callable[[], None]] = []
        self.active = True
        # filled by patch_model:
        self.method: Method | None = None
        self.params: dict[str, Any] = {}
        self.last_cache: Any = None  # the cache of the newest patched generate() call
        self.caches_made = 0  # how many generate() calls ran with a cache of this method

    def add_undo(self, undo: Callable[[], None]) -> None:
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


# -- patch_model -------------------------------------------------------------------------------------

# Name under which generate() takes a cache on the installed transformers: "cache" on recent versions,
# "past_key_values" on older ones (5.17), whose generate() does not know "cache".
GENERATE_CACHE_KWARG: str = ALL_CACHE_NAMES[0]
_CALLER_CACHE_KWARGS = ("cache", "past_key_values")
_ACTIVE = "_kvcompress_patch"  # instance attribute holding the active handle


def active_patch(model: torch.nn.Module) -> PatchHandle | None:
    """The handle of the active ``patch_model`` on ``model``, or ``None``."""
    handle = model.__dict__.get(_ACTIVE)
    return handle if handle is not None and handle.active else None


def _native_cache_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop cache keywords set to ``None``; on a transformers whose generate() predates ``cache=``, pass
    the caller's ``cache=`` on as ``past_key_values=``."""
    kwargs = {k: v for k, v in kwargs.items() if not (k in _CALLER_CACHE_KWARGS and v is None)}
    if GENERATE_CACHE_KWARG == "past_key_values" and "cache" in kwargs:
        if "past_key_values" in kwargs:
            raise ValueError("generate() got both cache= and past_key_values=; pass only one")
        kwargs["past_key_values"] = kwargs.pop("cache")
    return kwargs


def _caller_cache_choice(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """Why this generate() call must run as unpatched (the caller chose its own cache), or ``None``."""
    for name in _CALLER_CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return f"the caller passed its own cache ({name}=)"
    # generate(inputs, generation_config, ...): the config may come by keyword or second positionally
    config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
    if config is None:
        config = getattr(model, "generation_config", None)
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        return "the caller asked for use_cache=False"
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if implementation is not None:
        return f"the caller set cache_implementation={implementation!r}"
    return None


def _install_generate(model: torch.nn.Module, method: Method, params: dict[str, Any], handle: PatchHandle) -> None:
    """Give ``model`` an instance-level ``generate`` that adds a fresh cache of ``method`` to each call."""
    previous = model.__dict__.get("generate")  # another wrapper already on the instance, kept in the chain
    stock = type(model).generate

    @functools.wraps(stock)
    def generate(self, *args, **kwargs):
        reason = _caller_cache_choice(self, args, kwargs)  # judged on the caller's own keywords
        kwargs = _native_cache_kwargs(kwargs)
        if reason is None:
            cache = method.build(self, **params)
            kwargs[GENERATE_CACHE_KWARG] = cache
            handle.last_cache = cache
            handle.caches_made += 1
        else:
            logger.info("kvcompress: %s; this generate() call does not use the %r cache", reason, method.name)
        if previous is not None:
            return previous(*args, **kwargs)
        return stock(self, *args, **kwargs)

    # Bound to the instance (not a closure over it), so ``self`` is whatever object the method is read from.
    set_attribute(model, "generate", types.MethodType(generate, model), handle)


def patch_model(model: torch.nn.Module, method: str | Method, /, **params: Any) -> PatchHandle:
    """Make every later ``model.generate(...)`` (also through ``transformers.pipeline``) use ``method``.

    Each ``generate`` call without a caller-chosen cache gets a fresh cache built by the method's
    declaration (``kvcompress.registry``) with ``params``; methods with an ``install`` step (attention
    forwards) have it applied to ``model`` now. Only this model instance changes.

    Args:
        model: a transformers causal LM (anything with ``generate`` and a ``config``).
        method: a registered method name (see ``kvcompress.registry.list_methods()``).
        **params: the method's parameters; omitted ones take their declared defaults.

    Returns:
        A :class:`PatchHandle`; ``handle.remove()`` or leaving ``with handle:`` restores the model exactly.
        ``handle.last_cache`` is the newest call's cache.

    Raises:
        TypeError: ``model`` has no ``generate``/``config``, or a parameter name or type is wrong.
        ValueError: unknown method, unsupported ``model_type``, a value out of range, or the model is
            already patched (remove the active handle first). Nothing is changed when this raises.
    """
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(f"model must be a transformers model with generate(), got {type(model).__name__}")
    if getattr(model, "config", None) is None:
        raise TypeError(f"model must have a config, got {type(model).__name__} without one")
    from .registry import get_method

    spec = get_method(method)
    spec.check_family(model)
    resolved = spec.resolve_params(params)
    current = active_patch(model)
    if current is not None:
        raise ValueError(
            f"model is already patched: {current!r}; call that handle's remove() first (or patch inside "
            "'with patch_model(...):' blocks)"
        )
    spec.build(model, **resolved)  # limits that depend on the model raise here; the empty cache is dropped

    handle = PatchHandle(model, description=f"{spec.name} on {type(model).__name__}")
    handle.method, handle.params = spec, resolved
    try:
        if spec.install is not None:
            spec.install(model, handle, **resolved)
        _install_generate(model, spec, resolved, handle)
        set_attribute(model, _ACTIVE, handle, handle)
    except BaseException:  # includes KeyboardInterrupt: never leave a half-patched model
        handle.remove()
        raise
    return handle
