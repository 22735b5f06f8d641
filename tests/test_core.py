"""The shared core: parameter declarations (registry.MethodParams), the model-changing primitives
(kvcompress.hooks), the token buffers (kvcompress.storage) and the package's import graph."""

from __future__ import annotations

import ast
import inspect
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcompress import hooks, registry
from kvcompress.registry import MethodParams, Range, get_method, list_methods, param
from kvcompress.storage import GrowableLayer, StaticBufferLayer, grown_capacity, stock_crop_length

PACKAGE = Path(__file__).resolve().parent.parent / "kvcompress"


# -- parameter declarations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _ProbeParams(MethodParams):
    method: ClassVar[str] = "probe"

    level: int = param(3, "a level", Range(int, low=1, high=8))
    fraction: float | None = param(0.5, "a fraction", Range(float, low=0.0, high=1.0, low_open=True), none_ok=True)


def test_method_params_fill_defaults_and_validate_on_construction():
    assert _ProbeParams().as_dict() == {"level": 3, "fraction": 0.5}
    assert _ProbeParams(fraction=None, level=8).as_dict() == {"level": 8, "fraction": None}
    with pytest.raises(ValueError, match=r"probe: parameter level=9 is out of range; allowed: int in \[1, 8\]"):
        _ProbeParams(level=9)
    with pytest.raises(TypeError, match=r"probe: parameter level=True has type bool"):
        _ProbeParams(level=True)
    with pytest.raises(ValueError, match="fraction=0.0"):
        _ProbeParams(fraction=0.0)
    with pytest.raises(FrozenInstanceError):
        _ProbeParams().level = 4


def test_method_params_need_declared_fields():
    @dataclass(frozen=True)
    class Bare(MethodParams):
        plain: int = 1

    with pytest.raises(TypeError, match=r"Bare.plain must be declared with kvcompress.registry.param\(\)"):
        Bare.declared()


def test_register_method_takes_a_params_dataclass():
    method = registry.register_method("probe_dc", summary="t", build=lambda m, **p: p, params=_ProbeParams)
    try:
        assert [p.name for p in method.params] == ["level", "fraction"]
        assert method.resolve_params({"level": 2}) == {"level": 2, "fraction": 0.5}
        with pytest.raises(ValueError, match="probe_dc: parameter level=0"):
            method.resolve_params({"level": 0})
    finally:
        registry._METHODS.pop("probe_dc", None)


@pytest.mark.parametrize("name", [n for n in list_methods() if get_method(n).params])
def test_declared_defaults_are_the_signature_defaults(name):
    """Every method's cache class and patch function take their defaults from the one declaration."""
    import kvcompress

    declared = get_method(name).defaults()
    targets = {"xkv": [kvcompress.XKVCache.__init__], "mla": [kvcompress.patch_mla, kvcompress.MLALatentCache.__init__],
               "tpla": [kvcompress.patch_tpla, kvcompress.TPLACache.__init__],
               "quantized": [kvcompress.CountedQuantizedCache.__init__],
               "xkv_mla": [kvcompress.patch_xkv_mla, kvcompress.XKVLatentCache.__init__]}[name]
    for target in targets:
        signature = inspect.signature(target).parameters
        shared = {n: p.default for n, p in signature.items() if n in declared}
        assert shared, f"{target.__qualname__} takes none of {name}'s parameters"
        assert shared == {n: declared[n] for n in shared}, target.__qualname__


# -- hooks --------------------------------------------------------------------------------------------
def test_set_attribute_and_replace_forward_are_undone():
    module = torch.nn.Linear(2, 2)
    handle = hooks.PatchHandle(module)
    hooks.set_attribute(module, "marker", 1, handle)
    hooks.set_attribute(module, "in_features", 7, handle)
    hooks.replace_forward(module, lambda self, x: x * 0, handle)
    x = torch.ones(1, 2)
    assert module.marker == 1 and module.in_features == 7 and torch.equal(module(x), x * 0)
    handle.remove()
    assert not hasattr(module, "marker") and module.in_features == 2 and "forward" not in module.__dict__
    handle.remove()  # idempotent


def test_wrap_forward_cleans_up_after_keyboard_interrupt():
    module = torch.nn.Linear(2, 2)
    log = []

    def wrapper(self, original, x):
        log.append("open")
        try:
            if x.sum() < 0:
                raise KeyboardInterrupt
            return original(x)
        finally:
            log.append("close")

    handle = hooks.PatchHandle(module)
    hooks.wrap_forward(module, wrapper, handle)
    expected = torch.nn.functional.linear(torch.ones(1, 2), module.weight, module.bias)
    assert torch.equal(module(torch.ones(1, 2)), expected)
    with pytest.raises(KeyboardInterrupt):
        module(-torch.ones(1, 2))
    assert log == ["open", "close", "open", "close"]
    handle.remove()
    assert "forward" not in module.__dict__


def test_undo_on_failure_removes_a_half_applied_patch():
    module = torch.nn.Linear(2, 2)
    handle = hooks.PatchHandle(module)
    with pytest.raises(KeyboardInterrupt):
        with hooks.undo_on_failure(handle):
            hooks.set_attribute(module, "marker", 1, handle)
            raise KeyboardInterrupt
    assert not hasattr(module, "marker") and not handle.active


def test_register_attention_is_unregistered_by_the_last_user():
    def attention(*args, **kwargs):
        raise AssertionError("not called here")

    name = "kvcompress_test_attention"
    first, second = hooks.PatchHandle(), hooks.PatchHandle()
    hooks.register_attention(name, attention, "sdpa", first)
    hooks.register_attention(name, attention, "sdpa", second)
    assert ALL_ATTENTION_FUNCTIONS[name] is attention
    assert ALL_MASK_ATTENTION_FUNCTIONS[name] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    first.remove()
    assert name in ALL_ATTENTION_FUNCTIONS  # the second user still needs it
    second.remove()
    assert name not in ALL_ATTENTION_FUNCTIONS and name not in ALL_MASK_ATTENTION_FUNCTIONS
    with pytest.raises(KeyError):
        hooks.register_attention(name, attention, "no_such_implementation", hooks.PatchHandle())
    assert name not in ALL_ATTENTION_FUNCTIONS


# -- storage --------------------------------------------------------------------------------------------
def _stock_crop(length: int, argument: int):
    layer = DynamicLayer()
    states = torch.randn(1, 1, length, 2)
    layer.update(states, states)
    try:
        layer.crop(argument)
    except Exception as error:  # the stock error is the expected outcome
        return type(error)
    return layer.get_seq_length()


@pytest.mark.parametrize("argument", [0, -1, -5, -12, -100, 3, 12, 100])
def test_every_buffer_crops_as_dynamic_layer(argument):
    length = 12
    expected = _stock_crop(length, argument)
    states = torch.randn(2, 1, length, 3)
    for layer in (GrowableLayer(), StaticBufferLayer(max_cache_len=32)):
        layer.update(states, states)
        if isinstance(expected, type):
            with pytest.raises(expected):
                layer.crop(argument)
            assert int(layer.get_seq_length()) == length  # a refused crop changes nothing
        else:
            layer.crop(argument)
            assert int(layer.get_seq_length()) == expected
            assert layer.nbytes() == 2 * 2 * expected * 3 * 4
    if not isinstance(expected, type):
        assert stock_crop_length(length, argument) == expected


def test_static_buffer_refuses_overflow_and_keeps_its_storage():
    layer = StaticBufferLayer(max_cache_len=8)
    layer.update(torch.ones(1, 2, 6, 4), torch.ones(1, 2, 6, 4))
    storage = layer.keys
    with pytest.raises(ValueError, match="max_cache_len=8"):
        layer.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    assert int(layer.get_seq_length()) == 6 and layer.keys is storage
    layer.crop(-2)
    layer.update(2 * torch.ones(1, 2, 4, 4), 2 * torch.ones(1, 2, 4, 4))
    assert int(layer.get_seq_length()) == 8 and layer.keys is storage and layer.reserved_nbytes() == 2 * (2 * 8 * 4) * 4
    assert torch.equal(layer.keys[0, 0, 3:, 0], torch.tensor([1.0, 2, 2, 2, 2]))


def test_grown_capacity_is_proportional_and_geometric():
    # first allocation: the need plus a sixteenth of it (16..256 tokens) of room, rounded up to 16
    assert grown_capacity(300, 0) == 320  # 300 + 18, not 300 + a 256-token granule (768)
    assert grown_capacity(1, 0) == 32 and grown_capacity(64, 0) == 80
    assert grown_capacity(32_768, 0) == 32_768 + 256  # a long prompt: the room stops at 256 tokens
    assert grown_capacity(321, 320) == 400  # later: 1.25x
    assert grown_capacity(5000, 1024) == 5008  # the need wins when larger
    for needed in range(1, 5000, 7):
        first = grown_capacity(needed, 0)
        assert first % 16 == 0 and needed + 16 <= first <= max(needed * 1.0625, needed + 16) + 16
    sizes, capacity = [], 0
    for needed in range(1, 20_000):  # one token at a time: O(log n) reallocations, so O(n) copies in all
        if needed > capacity:
            capacity = grown_capacity(needed, capacity)
            sizes.append(capacity)
    assert len(sizes) < 30 and all(s % 16 == 0 for s in sizes)
    assert sum(sizes[:-1]) < 5 * 20_000  # tokens copied by the growths (each copies at most the old capacity)


# -- import graph -----------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _kvcompress_imports(path: Path) -> tuple[set[str], list[str]]:
    """(modules of kvcompress imported at module level, those imported inside functions)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    top, inner = set(), []

    def resolve(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name.startswith("kvcompress")]
        if node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not target.startswith("kvcompress"):
            return []
        # "from . import x" / "from .pkg import module": count submodules where they exist
        names = []
        for alias in node.names:
            candidate = f"{target}.{alias.name}"
            as_path = PACKAGE.parent / Path(*candidate.split("."))
            names.append(candidate if as_path.with_suffix(".py").exists() or as_path.is_dir() else target)
        return names

    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.update(resolve(node))
        elif isinstance(node, ast.If):  # TYPE_CHECKING blocks do not run
            continue
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner_node in ast.walk(node):
                if isinstance(inner_node, (ast.Import, ast.ImportFrom)):
                    inner.extend(resolve(inner_node))
    return top, inner


def test_registry_and_hooks_import_no_method():
    for name in ("registry.py", "hooks.py", "storage.py"):
        top, inner = _kvcompress_imports(PACKAGE / name)
        assert top <= {"kvcompress.models", "kvcompress.ops"} and not inner, (name, top, inner)


def test_module_level_import_graph_has_no_cycle():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        top, _ = _kvcompress_imports(path)
        graph[_module_name(path)] = {m for m in top if m != _module_name(path)}
    # a package's __init__ importing its own submodules is how packages are built: not a cycle
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, dep]))
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


# Calls that change a live model or transformers' global tables: only kvcompress.hooks makes them.
_MODEL_CHANGES = ("register_forward_hook", "register_forward_pre_hook", "set_attn_implementation",
                  "register_module_forward_hook", "_global_mapping")


def test_no_model_change_outside_hooks():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "hooks.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            called = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                called = node.func.attr
                if called == "register" and isinstance(node.func.value, ast.Name) and "ATTENTION" in node.func.value.id:
                    called = f"{node.func.value.id}.register"
            elif isinstance(node, ast.Attribute) and node.attr == "_global_mapping":
                called = node.attr
            if called in _MODEL_CHANGES or (called or "").endswith("ATTENTION_FUNCTIONS.register"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {called}")
    assert not offenders, "model changes outside kvcompress/hooks.py: " + ", ".join(offenders)
