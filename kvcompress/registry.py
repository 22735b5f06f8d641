"""Every KV-cache method by name: one declaration per method feeds ``make_cache``, ``patch_model``,
the error messages and the ``kvcompress methods`` table.

A method's parameters are declared once, as a frozen dataclass deriving from :class:`MethodParams`
whose fields are the parameters, each made with :func:`param` (default, accepted types and ranges, one
line of help). Constructing it validates every value (``__post_init__``), so the cache class, the
registry and the command line share one set of rules and one wording of errors. The method module then
calls :func:`register_method` with its name, the model families it supports (by ``config.model_type``),
that dataclass and a ``build(model_or_config, **params)`` function returning a fresh cache. Methods that
also need a different attention forward (MLA's absorbed attention) declare ``install(model, handle,
**params)``, which :func:`kvcompress.patch.patch_model` calls; ``install`` makes every change through
:mod:`kvcompress.hooks` with the handle it is given, so that ``handle.remove()`` undoes it.

This module imports no method: each method module registers itself when imported (``import kvcompress``
imports them all), so the import graph has no cycle.

Validation order, all before any cache is built or any model touched: unknown method name, unsupported
model family, unknown parameter name, parameter type, parameter range. Limits that depend on the
model (e.g. xKV's ``group_size`` must divide the number of layers) are checked by the cache class
itself, with messages of the same form.

Adding a method: write its module (cache, parameter dataclass, ``register_method(...)`` at the end) and
import it from ``kvcompress/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .models import text_config


@dataclass(frozen=True)
class Range:
    """Values of one Python type a parameter accepts, with optional bounds (or a list of choices).

    ``kind`` is matched exactly: ``True`` is not an ``int``; an ``int`` is accepted where only
    ``float`` ranges exist (``1`` for a float parameter means ``1.0``).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is excluded
    high_open: bool = False
    choices: tuple | None = None

    def matches_type(self, value: object) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        return isinstance(value, self.kind)

    def contains(self, value: object) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.kind is bool:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def describe(self) -> str:
        name = self.kind.__name__
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "True or False"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{name} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{name} {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{name} {'<' if self.high_open else '<='} {_num(self.high)}"
        return name


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its default, what it accepts, and a line of help.

    ``accepts`` lists the :class:`Range` s allowed (any one may match); ``none_ok`` also allows ``None``.
    ``note`` adds a limit that depends on the model (checked by the cache class), shown in help only.
    """

    name: str
    default: Any
    help: str
    accepts: tuple[Range, ...]
    none_ok: bool = False
    note: str = ""

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``int >= 1, float in (0, 1], or None``."""
        parts = [r.describe() for r in self.accepts] + (["None"] if self.none_ok else [])
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
        return f"{text} ({self.note})" if self.note else text

    def validate(self, value: object, method: str) -> None:
        """Raise ``TypeError`` (wrong type) or ``ValueError`` (out of range) naming the parameter."""
        if value is None and self.none_ok:
            return
        same_type = [r for r in self.accepts if r.matches_type(value)]
        if not same_type and isinstance(value, int) and not isinstance(value, bool):
            # an int where only floats are accepted: compare as a float
            same_type = [r for r in self.accepts if r.kind is float]
        if not same_type:
            raise TypeError(
                f"{method}: parameter {self.name}={value!r} has type {type(value).__name__}; allowed: {self.allowed()}"
            )
        if not any(r.contains(value) for r in same_type):
            raise ValueError(f"{method}: parameter {self.name}={value!r} is out of range; allowed: {self.allowed()}")

    def parse(self, text: str, method: str) -> Any:
        """Convert a command-line string (``'None'``, ``'true'``, ``'8'``, ``'0.25'``, a choice) to a value
        of an accepted type, then validate it."""
        stripped = text.strip()
        if stripped.lower() == "none" and self.none_ok:
            return None
        kinds = [r.kind for r in self.accepts]
        value: object = stripped
        if bool in kinds and stripped.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = stripped.lower() in ("true", "1", "yes")
        elif int in kinds and re.fullmatch(r"[+-]?\d+", stripped):
            value = int(stripped)
        elif float in kinds:
            try:
                value = float(stripped)
            except ValueError:
                pass
        self.validate(value, method)
        return value


_DECLARATION = "kvcompress_param"  # dataclass field metadata key holding a parameter's declaration


def param(default: Any, help: str, *accepts: Range, none_ok: bool = False, note: str = "") -> Any:
    """One field of a :class:`MethodParams` dataclass: the default, the accepted :class:`Range` s (any one
    may match), whether ``None`` is allowed, one line of help, and a ``note`` for a limit that depends on
    the model (checked by the cache class, shown in help only)."""
    if not accepts:
        raise ValueError("param() needs at least one Range of accepted values")
    return field(default=default, metadata={_DECLARATION: (help, tuple(accepts), none_ok, note)})


@dataclass(frozen=True)
class MethodParams:
    """Base class of a method's parameter declaration (a frozen dataclass, one :func:`param` field each).

    ``MyParams(**values)`` fills in the defaults and validates every value, raising ``TypeError`` (wrong
    type) or ``ValueError`` (out of range) that names the method (``method``, a class attribute), the
    parameter and the allowed values. :meth:`declared` gives the parameters as :class:`Param` s for the
    registry's table and command-line parsing.
    """

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for p in self.declared():
            p.validate(getattr(self, p.name), self.method or type(self).__name__)

    @classmethod
    def declared(cls) -> tuple[Param, ...]:
        """The parameters, in declaration order."""
        out = []
        for f in dataclasses.fields(cls):
            if _DECLARATION not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name} must be declared with kvcompress.registry.param()")
            help_text, accepts, none_ok, note = f.metadata[_DECLARATION]
            out.append(Param(f.name, f.default, help_text, accepts, none_ok=none_ok, note=note))
        return tuple(out)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{name: default}`` of every parameter."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def as_dict(self) -> dict[str, Any]:
        """``{name: value}`` of every parameter."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Method:
    """A registered method; build caches with :func:`make_cache`, patch models with ``patch_model``."""

    name: str
    summary: str
    build: Callable[..., Any]
    params: tuple[Param, ...] = ()
    families: tuple[str, ...] | None = None  # config.model_type values; None: any decoder-only model
    install: Callable[..., None] | None = None
    cache_class: str = ""
    doc: str = ""
    params_class: type[MethodParams] | None = None  # the declaration, when given as a dataclass
    param_map: Mapping[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_map", {p.name: p for p in self.params})

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def families_text(self) -> str:
        return "any decoder-only model" if self.families is None else ", ".join(self.families)

    def check_family(self, model_or_config) -> None:
        """Raise ``ValueError`` naming the model type and the supported families if this method does not
        support the model."""
        cfg = text_config(model_or_config)
        model_type = getattr(cfg, "model_type", None)
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"method {self.name!r} supports decoder-only models; got encoder-decoder {model_type!r}")
        if self.families is not None and model_type not in self.families:
            raise ValueError(
                f"method {self.name!r} does not support model_type={model_type!r}; supported model types: "
                f"{', '.join(self.families)}"
            )

    def resolve_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults overridden by ``params``, every value validated, then the rules between parameters
        (the ``__post_init__`` of the method's :class:`MethodParams` dataclass); raises before anything is
        built."""
        unknown = [k for k in params if k not in self.param_map]
        if unknown:
            allowed = ", ".join(self.param_map) or "(none)"
            raise TypeError(f"method {self.name!r} has no parameter {unknown[0]!r}; allowed parameters: {allowed}")
        for key, value in params.items():
            self.param_map[key].validate(value, self.name)
        resolved = {**self.defaults(), **params}
        if self.params_class is not None:  # rules between parameters live in the dataclass's __post_init__
            self.params_class(**resolved)
        return resolved

    def parse_cli_params(self, assignments: Iterable[str]) -> dict[str, Any]:
        """``['rank_k=0.25', 'window=32']`` -> ``{'rank_k': 0.25, 'window': 32}``, typed and validated."""
        out: dict[str, Any] = {}
        for item in assignments:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"method parameters are given as NAME=VALUE, got {item!r}")
            if key not in self.param_map:
                allowed = ", ".join(self.param_map) or "(none)"
                raise TypeError(f"method {self.name!r} has no parameter {key!r}; allowed parameters: {allowed}")
            out[key] = self.param_map[key].parse(text, self.name)
        return out


_METHODS: dict[str, Method] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_method(
    name: str,
    *,
    summary: str,
    build: Callable[..., Any],
    params: type[MethodParams] | Sequence[Param] = (),
    families: Sequence[str] | None = None,
    install: Callable[..., None] | None = None,
    cache_class: str = "",
    doc: str = "",
    replace: bool = False,
) -> Method:
    """Declare a method under ``name`` (lower-case identifier) and return its :class:`Method`.

    Args:
        summary: one line for ``kvcompress methods``.
        build: ``build(model_or_config, **params) -> Cache``; receives every declared parameter, defaults
            filled in and validated.
        params: the parameter declaration, a :class:`MethodParams` dataclass (or a sequence of
            :class:`Param`, each with default, allowed values and help).
        families: the ``config.model_type`` values supported; ``None`` for any decoder-only model.
        install: optional ``install(model, handle, **params)``, called by ``patch_model`` to change the
            model (e.g. its attention forward) through :mod:`kvcompress.hooks` and ``handle``.
        cache_class: dotted name of the cache class, for the table.
        doc: the page in docs/ that explains the method.
        replace: allow replacing a method of the same name (otherwise that is a ``ValueError``).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"method name must be a lower-case identifier like 'xkv', got {name!r}")
    if name in _METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered; pass replace=True to replace it")
    if not callable(build):
        raise TypeError(f"build must be callable, got {build!r}")
    if install is not None and not callable(install):
        raise TypeError(f"install must be callable or None, got {install!r}")
    params_class = None
    if isinstance(params, type) and issubclass(params, MethodParams):
        params_class, params = params, params.declared()
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"method {name!r} declares a parameter twice: {names}")
    for p in params:
        p.validate(p.default, name)  # a declaration whose default is not allowed is a bug
    method = Method(name=name, summary=summary, build=build, params=tuple(params),
                    families=None if families is None else tuple(families), install=install,
                    cache_class=cache_class, doc=doc, params_class=params_class)
    _METHODS[name] = method
    return method


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order (``dynamic`` first)."""
    return list(_METHODS)


def get_method(name: str) -> Method:
    """The declaration of method ``name`` (a :class:`Method` is returned as is); ``ValueError`` listing the
    known names if there is none."""
    if isinstance(name, Method):
        return name
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name (str), got {type(name).__name__}; known methods: {', '.join(_METHODS)}")
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def make_cache(name: str, model_or_config, **params):
    """A fresh cache of method ``name`` for ``model_or_config``.

    Checks, in order and before building anything: the method exists, it supports the model's
    ``model_type``, every parameter name is declared, every value has an allowed type and range.
    """
    method = get_method(name)
    method.check_family(model_or_config)
    resolved = method.resolve_params(params)
    return method.build(model_or_config, **resolved)


# -- the stock baseline ------------------------------------------------------------------------------


def _build_dynamic(model_or_config):
    from transformers import DynamicCache

    # exactly what generate() builds when given no cache
    return DynamicCache(config=text_config(model_or_config))


register_method(
    "dynamic",
    summary="stock transformers DynamicCache: the uncompressed baseline",
    build=_build_dynamic,
    cache_class="transformers.DynamicCache",
)
