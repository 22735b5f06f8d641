"""Methods as the command lines name them: ``name[:param=value[:param=value...]]``, e.g.
``dynamic`` or ``xkv:rank_k=0.25:rank_v=0.375``, and a comma list of them.

This is the one parser of that syntax (``kvcompress bench``, ``kvcompress ruler`` and the scripts in
benchmarks/ all use it). The name is looked up in the registry and every ``param=value`` is typed and
checked by the method's own declaration (:meth:`kvcompress.registry.Method.parse_cli_params`), so a
misspelt name, an unknown parameter or an out-of-range value is refused while the arguments are parsed,
before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

EXAMPLE = "dynamic,xkv:rank_k=0.25:rank_v=0.375"


@dataclass(frozen=True)
class MethodSpec:
    """A method as given on the command line: ``label`` is the spec text, ``name`` and ``params`` parsed."""

    label: str
    name: str
    params: dict = field(default_factory=dict)


def parse_method_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"xkv:rank_k=0.25:window=8"`` -> ``("xkv", {"rank_k": 0.25, "window": 8})``.

    Raises ``ValueError`` (unknown method, a part that is not ``param=value``, a value out of range) or
    ``TypeError`` (undeclared parameter, a value of the wrong type), each naming the method or parameter
    and what is allowed.
    """
    from kvcompress.registry import get_method

    name, *assignments = text.strip().split(":")
    name = name.strip().lower()
    if not name:
        raise ValueError(f"method spec {text!r} has no method name; expected name[:param=value...], e.g. {EXAMPLE}")
    method = get_method(name)  # ValueError listing the known methods
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"method spec {text!r}: {item!r} is not param=value (expected name:param=value:...)")
    params = method.parse_cli_params(assignments)
    method.resolve_params(params)  # rules between parameters (e.g. quantized's nbits per backend)
    return name, params


def parse_method_specs(spec: str | Iterable[str]) -> list[MethodSpec]:
    """``"dynamic,xkv:rank_k=0.25:rank_v=0.375"`` -> a :class:`MethodSpec` per item (labels must differ)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ValueError(f"methods must name at least one method, e.g. {EXAMPLE!r}")
    out = []
    for item in items:
        name, params = parse_method_spec(item)
        out.append(MethodSpec(item, name, params))
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods: each method may appear once, got {labels}")
    return out


def make_cache(method: MethodSpec, model):
    """A fresh cache for ``method`` on ``model`` (``kvcompress.registry.make_cache``: checks the model family)."""
    from kvcompress.registry import make_cache as registry_make_cache

    return registry_make_cache(method.name, model, **method.params)


def install_method_needed(method: MethodSpec) -> bool:
    """True for registry methods with an ``install`` step (they change the model's attention)."""
    from kvcompress.registry import get_method

    return getattr(get_method(method.name), "install", None) is not None


def install_method(method: MethodSpec, model):
    """For methods that change the model's attention (an ``install`` step, e.g. MLA), patch the model with
    ``kvcompress.patch.patch_model`` and return the handle (its ``last_cache`` is the cache each
    ``generate`` built); ``None`` for plain cache methods."""
    if not install_method_needed(method):
        return None
    from kvcompress.patch import patch_model

    return patch_model(model, method.name, **method.params)
