"""The method registry (kvcompress.registry): every method builds a working cache through make_cache, and
every bad call is refused, before anything is built, with a message naming what is wrong and what is
allowed. Tiny random models built here; seconds on CPU."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_config, tiny_model
from kvcompress import registry
from kvcompress.quantized import backend_available
from kvcompress.registry import Param, Range, get_method, list_methods, make_cache, register_method

TINY_FAMILIES = ("llama", "qwen2", "mistral", "deepseek_v2", "deepseek_v3")
# Small windows so a short prompt is really compressed by the methods that compress prompt tokens.
# The quantized peer: a group that divides the tiny head dim (16), a residual the decode steps overflow, and
# the backend that is installed (hqq needs no compiled extension; the test extra brings optimum-quanto).
SHORT_PROMPT_PARAMS = {"xkv": dict(window=8, sink=2, min_compress_tokens=4),
                       "quantized": dict(backend="hqq" if backend_available("hqq") else "quanto", nbits=4,
                                         q_group_size=16, residual_length=2)}


def tiny_family_for(method_name: str) -> str:
    """A family this method supports that conftest can build a tiny model of."""
    families = get_method(method_name).families or ("llama",)
    usable = [f for f in families if f in TINY_FAMILIES]
    assert usable, f"method {method_name!r} supports {families}: add a tiny config for one of them to conftest"
    return usable[0]


def generate_kwargs(model, cache) -> dict:
    return {cache_key(model): cache, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}


def held_bytes(cache) -> int:
    """Bytes of a cache's tensors: its own nbytes(), or a stock cache's layer tensors."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))


@pytest.fixture
def probe_method():
    """A throwaway method whose build records its calls; unregistered afterwards."""
    calls = []

    def build(model_or_config, **params):
        calls.append(params)
        return DynamicCache(config=model_or_config.config if hasattr(model_or_config, "config") else model_or_config)

    register_method(
        "probe", summary="test method", build=build, families=("llama",),
        params=[Param("level", 3, "a level", (Range(int, low=1, high=8),)),
                Param("fraction", 0.5, "a fraction", (Range(float, low=0.0, high=1.0, low_open=True),), none_ok=True),
                Param("mode", "fast", "a mode", (Range(str, choices=("fast", "exact")),))],
    )
    yield calls
    registry._METHODS.pop("probe", None)


def test_builtin_methods_listed_baseline_first():
    names = list_methods()
    assert names[:3] == ["dynamic", "xkv", "mla"]
    assert all(get_method(n).name == n for n in names)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_round_trips_through_make_cache(name):
    """make_cache gives a fresh cache of the declared class that generate() really fills: its token count
    is the prompt plus the decoded tokens, and its bytes match its own memory formula."""
    family = tiny_family_for(name)
    model = tiny_model(family)
    prompt = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = make_cache(name, model, **SHORT_PROMPT_PARAMS.get(name, {}))
    other = make_cache(name, model.config, **SHORT_PROMPT_PARAMS.get(name, {}))
    assert cache is not other and cache.get_seq_length() == 0
    expected_class = get_method(name).cache_class.rsplit(".", 1)[-1]
    assert type(cache).__name__ == expected_class
    out = model.generate(prompt, **generate_kwargs(model, cache))
    assert out.shape == (2, 44)
    assert cache.get_seq_length() == 43  # the last token is never fed back
    assert held_bytes(cache) > 0
    if hasattr(cache, "expected_nbytes"):
        assert cache.nbytes() == cache.expected_nbytes()


@pytest.mark.parametrize("name, family", [(n, f) for n in list_methods()
                                          for f in (get_method(n).families or TINY_FAMILIES) if f in TINY_FAMILIES])
def test_every_declared_family_really_works(name, family):
    """A declaration's families are a promise: each one the tests can build runs a prefill and a decode step."""
    model = tiny_model(family)
    prompt = torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(3))
    cache, logits = prefilled(model, prompt, name, **SHORT_PROMPT_PARAMS.get(name, {}))
    model(logits[:, -1:].argmax(-1), **{cache_key(model): cache})
    assert cache.get_seq_length() == 21


def test_dynamic_is_exactly_the_stock_cache():
    model = tiny_model("llama")
    prompt = torch.randint(3, 160, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = make_cache("dynamic", model)
    assert type(cache) is DynamicCache
    stock = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
                           return_dict_in_generate=True, output_logits=True)
    ours = model.generate(prompt, **dict(generate_kwargs(model, cache), max_new_tokens=6),
                          return_dict_in_generate=True, output_logits=True)
    assert torch.equal(stock.sequences, ours.sequences)
    assert all(torch.equal(a, b) for a, b in zip(stock.logits, ours.logits))


def cache_key(model) -> str:
    """transformers 5.24 calls the forward's cache argument ``cache``, 5.17 ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefilled(model, prompt, name, **params):
    """A cache of method ``name`` after the model's forward over ``prompt``, and that forward's logits."""
    cache = make_cache(name, model, **params)
    logits = model(prompt, **{cache_key(model): cache}).logits
    return cache, logits


def test_xkv_compresses_and_full_rank_matches_stock():
    """Through make_cache, xkv with default ranks holds fewer bytes than the stock cache for the same
    prompt; with full rank its next decode step matches the stock one (the SVD round trip is lossless)."""
    model = tiny_model("llama")
    prompt = torch.randint(3, 160, (1, 200), generator=torch.Generator().manual_seed(2))
    stock, stock_logits = prefilled(model, prompt, "dynamic")
    small, _ = prefilled(model, prompt, "xkv", **SHORT_PROMPT_PARAMS["xkv"])
    assert 0 < small.nbytes() < held_bytes(stock)
    lossless, lossless_logits = prefilled(model, prompt, "xkv", rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, **SHORT_PROMPT_PARAMS["xkv"])
    assert lossless.nbytes() > 0 and len(lossless.groups[0].segments) == 1  # it did compress the prompt
    assert torch.equal(stock_logits, lossless_logits)  # the prefill attends over exact states
    next_token = stock_logits[:, -1:].argmax(-1)
    ref_step = model(next_token, **{cache_key(model): stock}).logits
    got_step = model(next_token, **{cache_key(model): lossless}).logits
    assert torch.allclose(ref_step, got_step, atol=1e-4)


def test_xkv_declaration_matches_the_class_signature():
    """The registry reads xKV's defaults from XKVCache itself and declares every one of its parameters."""
    from kvcompress.xkv import XKVCache

    signature = inspect.signature(XKVCache.__init__).parameters
    class_params = {n: p.default for n, p in signature.items() if n not in ("self", "config")}
    assert get_method("xkv").defaults() == class_params


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match=re.escape(f"unknown method 'nope'; known methods: {', '.join(list_methods())}")):
        make_cache("nope", tiny_config("llama"))
    with pytest.raises(TypeError, match="method name"):
        get_method(3)


def test_unknown_parameter_names_it_and_the_allowed_ones(probe_method):
    with pytest.raises(TypeError, match=r"no parameter 'rnak_k'; allowed parameters: group_size, rank_k, rank_v, "
                                        r"window, sink, pre_rope, min_compress_tokens"):
        make_cache("xkv", tiny_config("llama"), rnak_k=4)
    with pytest.raises(TypeError, match=r"'dynamic' has no parameter 'window'; allowed parameters: \(none\)"):
        make_cache("dynamic", tiny_config("llama"), window=4)
    with pytest.raises(TypeError, match="no parameter 'levl'"):
        make_cache("probe", tiny_config("llama"), levl=2)
    assert probe_method == []


@pytest.mark.parametrize(
    "params, error, message",
    [
        (dict(window=-1), ValueError, r"window=-1 is out of range; allowed: int >= 0"),
        (dict(sink=-2), ValueError, r"sink=-2 is out of range; allowed: int >= 0"),
        (dict(min_compress_tokens=0), ValueError, r"min_compress_tokens=0 is out of range; allowed: int >= 1"),
        (dict(rank_k=1.5), ValueError, r"rank_k=1.5 is out of range; allowed: int >= 1, float in \(0, 1\] or None"),
        (dict(rank_v=0.0), ValueError, r"rank_v=0.0 is out of range"),
        (dict(rank_k=0), ValueError, r"rank_k=0 is out of range"),
        (dict(group_size=0), ValueError, r"group_size=0 is out of range; allowed: int >= 1 or None"),
        (dict(window="8"), TypeError, r"window='8' has type str; allowed: int >= 0"),
        (dict(window=True), TypeError, r"window=True has type bool"),
        (dict(pre_rope=1), TypeError, r"pre_rope=1 has type int; allowed: True or False"),
        (dict(rank_k=float("nan")), ValueError, r"rank_k=nan is out of range"),
    ],
)
def test_out_of_range_and_wrong_type_name_the_parameter(params, error, message):
    with pytest.raises(error, match=message):
        make_cache("xkv", tiny_config("llama"), **params)


def test_validation_happens_before_build(probe_method):
    cfg = tiny_config("llama")
    for bad in (dict(level=9), dict(level=0), dict(fraction=0.0), dict(fraction=2), dict(mode="slow"),
                dict(level=2.0)):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            make_cache("probe", cfg, **bad)
    with pytest.raises(ValueError, match=r"mode='slow' is out of range; allowed: one of 'fast', 'exact'"):
        make_cache("probe", cfg, mode="slow")
    assert probe_method == []  # build never ran
    make_cache("probe", cfg, fraction=1, level=8)  # int accepted for a float; bounds inclusive
    make_cache("probe", cfg, fraction=None)
    assert probe_method == [dict(level=8, fraction=1, mode="fast"), dict(level=3, fraction=None, mode="fast")]


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2"])
def test_unsupported_family_names_model_type_and_supported_ones(family, probe_method):
    cfg = tiny_config(family)
    with pytest.raises(ValueError, match=rf"'probe' does not support model_type='{family}'; supported model "
                                         r"types: llama"):
        make_cache("probe", cfg)
    assert probe_method == []
    with pytest.raises(ValueError, match=r"'xkv' does not support model_type='deepseek_v2'; supported model types: "
                                         r"llama, qwen2, mistral"):
        make_cache("xkv", tiny_config("deepseek_v2"))


def test_model_dependent_limit_is_checked_by_the_class():
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the 4 full-attention layers"):
        make_cache("xkv", tiny_config("llama"), group_size=3)


def test_register_method_refuses_bad_declarations(probe_method):
    build = lambda cfg: None  # noqa: E731
    with pytest.raises(ValueError, match="already registered"):
        register_method("probe", summary="again", build=build)
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_method("Bad Name", summary="x", build=build)
    with pytest.raises(TypeError, match="build must be callable"):
        register_method("other", summary="x", build=None)
    with pytest.raises(ValueError, match="out of range"):
        register_method("other", summary="x", build=build, params=[Param("n", -1, "n", (Range(int, low=0),))])
    with pytest.raises(ValueError, match="declares a parameter twice"):
        p = Param("n", 1, "n", (Range(int, low=0),))
        register_method("other", summary="x", build=build, params=[p, p])
    assert "other" not in list_methods()
    replaced = register_method("probe", summary="replaced", build=build, replace=True)
    assert get_method("probe") is replaced


def test_cli_strings_are_parsed_by_the_declaration():
    xkv = get_method("xkv")
    parsed = xkv.parse_cli_params(["rank_k=0.25", "rank_v=8", "group_size=None", "pre_rope=false", "window=0"])
    assert parsed == dict(rank_k=0.25, rank_v=8, group_size=None, pre_rope=False, window=0)
    assert type(parsed["rank_v"]) is int and type(parsed["rank_k"]) is float
    with pytest.raises(ValueError, match=r"window=-1 is out of range; allowed: int >= 0"):
        xkv.parse_cli_params(["window=-1"])
    with pytest.raises(TypeError, match=r"window='eight' has type str"):
        xkv.parse_cli_params(["window=eight"])
    with pytest.raises(TypeError, match=r"no parameter 'windw'; allowed parameters: group_size"):
        xkv.parse_cli_params(["windw=3"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        xkv.parse_cli_params(["window"])


def test_mla_max_cache_len_builds_a_static_capacity_cache():
    from kvcompress.mla import StaticMLALatentLayer

    cfg = tiny_config("deepseek_v2")
    cache = make_cache("mla", cfg, max_cache_len=64)
    assert all(isinstance(layer, StaticMLALatentLayer) for layer in cache.layers)
    assert not any(isinstance(layer, StaticMLALatentLayer) for layer in make_cache("mla", cfg).layers)
    with pytest.raises(ValueError, match="max_cache_len"):
        make_cache("mla", cfg, max_cache_len=0)
