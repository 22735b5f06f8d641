"""``patch_model``: switch a registered method on for an existing model or pipeline.

``patch_model(model, method, **params)`` makes every later ``model.generate(...)`` on that instance,
including the calls a ``transformers.pipeline`` makes, run with a fresh cache of ``method``; methods that
need another attention forward install it too (their ``install`` step, which changes the model only
through :mod:`kvcompress.hooks`, so ``handle.remove()`` undoes everything). Rules, documented in
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
from typing import Any

import torch
from transformers.generation.utils import ALL_CACHE_NAMES

from .hooks import PatchHandle, replace_forward, set_attribute, undo_on_failure
from .registry import Method, get_method

logger = logging.getLogger(__name__)

__all__ = ["GENERATE_CACHE_KWARG", "PatchHandle", "active_patch", "patch_model", "replace_forward", "set_attribute"]


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
    with undo_on_failure(handle):  # also on KeyboardInterrupt: never leave a half-patched model
        if spec.install is not None:
            spec.install(model, handle, **resolved)
        _install_generate(model, spec, resolved, handle)
        set_attribute(model, _ACTIVE, handle, handle)
    return handle
