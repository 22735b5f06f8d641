"""patch_model(): a patched model's generate() (direct, or through transformers.pipeline) really runs with the
method's cache; remove() gives back a model whose outputs equal the never-patched model's bit for bit; the
caller's own cache choices win; bad calls change nothing. Tiny random models and a word-level tokenizer
built here (no downloads); seconds on CPU, except the one slow test on SmolLM2."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import DynamicCache, PreTrainedTokenizerFast, pipeline

from conftest import tiny_model
from kvcompress import patch as patch_module
from kvcompress import registry
from kvcompress.patch import PatchHandle, active_patch, patch_model, replace_forward
from kvcompress.registry import Param, Range, get_method, list_methods, register_method
from test_registry import SHORT_PROMPT_PARAMS, cache_key, held_bytes, tiny_family_for

WORDS = [f"w{i}" for i in range(150)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over 'w0'..'w149' (ids 4..153) with pad/bos/eos/unk 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def prompt_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 154, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_generate(model, ids, **kwargs):
    """Greedy generate returning sequences and per-step logits (bit-for-bit comparisons)."""
    kwargs = dict(dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
                       return_dict_in_generate=True, output_logits=True), **kwargs)
    return model.generate(ids, **kwargs)


def returned_cache(output):
    """The cache a generate() output carries (``cache`` on transformers 5.24, ``past_key_values`` on 5.17)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


def assert_same_outputs(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def model_state(model) -> tuple:
    """What patching may touch: the instance attributes of every module, and the forward each one runs."""
    return tuple((name, sorted(m.__dict__), m.forward.__func__) for name, m in model.named_modules())


@pytest.mark.parametrize("name", list_methods())
def test_every_method_round_trips_through_patch_model(name):
    family = tiny_family_for(name)
    model = tiny_model(family)
    ids = prompt_ids(40, batch=2)
    before = model_state(model)
    reference = run_generate(model, ids)
    params = SHORT_PROMPT_PARAMS.get(name, {})
    handle = patch_model(model, name, **params)
    assert active_patch(model) is handle and handle.method is get_method(name)
    assert handle.params == {**get_method(name).defaults(), **params}
    first = run_generate(model, ids)
    cache = handle.last_cache
    assert type(cache).__name__ == get_method(name).cache_class.rsplit(".", 1)[-1]
    assert returned_cache(first) is cache  # the call really ran on this cache
    assert cache.get_seq_length() == 44 and held_bytes(cache) > 0
    if hasattr(cache, "expected_nbytes"):
        assert cache.nbytes() == cache.expected_nbytes()
    run_generate(model, ids)
    assert handle.caches_made == 2 and handle.last_cache is not cache  # a fresh cache per call
    handle.remove()
    assert active_patch(model) is None and handle.last_cache is None
    assert model_state(model) == before
    assert_same_outputs(run_generate(model, ids), reference)


def test_dynamic_patch_is_bit_identical_to_unpatched():
    """Patching with the stock baseline changes nothing observable: greedy, sampling and beam search."""
    model = tiny_model("llama")
    ids = prompt_ids(12, batch=2, seed=3)
    kinds = [dict(), dict(num_beams=3, output_logits=False, output_scores=True)]
    references = [run_generate(model, ids, **k) for k in kinds]
    torch.manual_seed(7)
    sampled_ref = model.generate(ids, max_new_tokens=5, do_sample=True, pad_token_id=0)
    with patch_model(model, "dynamic") as handle:
        for k, ref in zip(kinds, references):
            got = run_generate(model, ids, **k)
            assert torch.equal(got.sequences, ref.sequences)
            for x, y in zip(got.logits or got.scores, ref.logits or ref.scores):
                assert torch.equal(x, y)
        torch.manual_seed(7)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=True, pad_token_id=0), sampled_ref)
        assert handle.caches_made == 3
    assert not handle.active


def test_xkv_patch_compresses_and_full_rank_tracks_stock():
    model = tiny_model("llama")
    ids = prompt_ids(200, seed=4)
    stock = run_generate(model, ids)
    with patch_model(model, "xkv", rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, **SHORT_PROMPT_PARAMS["xkv"]) as handle:
        lossless = run_generate(model, ids)
        assert len(handle.last_cache.groups[0].segments) == 1  # the prompt was compressed...
    assert torch.equal(lossless.sequences, stock.sequences)  # ...losslessly
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(lossless.logits, stock.logits))
    with patch_model(model, "xkv", **SHORT_PROMPT_PARAMS["xkv"]) as handle:
        run_generate(model, ids)
        assert handle.last_cache.nbytes() < held_bytes(returned_cache(stock))


def test_pipeline_on_a_patched_model_uses_the_method_cache():
    """A pipeline that never mentions kvcompress, built before or after patching, uses the xKV cache while
    the patch is active and is back to stock after remove()."""
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    text = " ".join(WORDS[:120])
    built_before = pipeline("text-generation", model=model, tokenizer=tokenizer)
    gen = dict(max_new_tokens=4, do_sample=False)
    reference = built_before(text, **gen)[0]["generated_text"]
    prompt_tokens = len(tokenizer(text)["input_ids"])
    stock = DynamicCache(config=model.config)
    built_before(text, **gen, **{cache_key(model): stock})  # the same call with a stock cache, for its bytes

    handle = patch_model(model, "xkv", **SHORT_PROMPT_PARAMS["xkv"])
    built_after = pipeline("text-generation", model=model, tokenizer=tokenizer)
    for number, pipe in enumerate((built_before, built_after), start=1):
        pipe(text, **gen)
        cache = handle.last_cache
        assert handle.caches_made == number
        assert type(cache).__name__ == "XKVCache"
        assert cache.get_seq_length() == prompt_tokens + 3
        assert cache.nbytes() == cache.expected_nbytes()
        assert cache.nbytes() < held_bytes(stock) * 0.8
    handle.remove()
    assert built_before(text, **gen)[0]["generated_text"] == reference
    assert built_after(text, **gen)[0]["generated_text"] == reference
    assert handle.caches_made == 2


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_caller_cache_wins_with_a_note(keyword, caplog):
    model = tiny_model("llama")
    ids = prompt_ids(30, seed=5)
    reference = run_generate(model, ids, **{cache_key(model): DynamicCache(config=model.config)})
    with patch_model(model, "xkv", **SHORT_PROMPT_PARAMS["xkv"]) as handle:
        own = DynamicCache(config=model.config)
        with caplog.at_level(logging.INFO, logger="kvcompress.patch"):
            got = run_generate(model, ids, **{keyword: own})
        assert handle.caches_made == 0 and handle.last_cache is None
        assert own.get_seq_length() == 34 and returned_cache(got) is own
        assert_same_outputs(got, reference)
        assert f"the caller passed its own cache ({keyword}=)" in caplog.text


@pytest.mark.parametrize("choice, note", [(dict(use_cache=False), "use_cache=False"),
                                          (dict(cache_implementation="dynamic"), "cache_implementation='dynamic'")])
def test_caller_cache_settings_win(choice, note, caplog):
    model = tiny_model("llama")
    ids = prompt_ids(20, seed=6)
    reference = run_generate(model, ids, **choice)
    with patch_model(model, "xkv") as handle:
        with caplog.at_level(logging.INFO, logger="kvcompress.patch"):
            got = run_generate(model, ids, **choice)
            model.generation_config.update(**choice)  # the same choice made on the model's generation config
            try:
                again = run_generate(model, ids)
            finally:
                model.generation_config.update(use_cache=True, cache_implementation=None)
        assert handle.caches_made == 0
    assert_same_outputs(got, reference)
    assert_same_outputs(again, reference)
    assert caplog.text.count(note) == 2


def test_cache_keyword_on_a_transformers_without_it(monkeypatch):
    """Where generate() predates ``cache=`` (5.17), the caller's cache= is passed on as past_key_values=."""
    monkeypatch.setattr(patch_module, "GENERATE_CACHE_KWARG", "past_key_values")
    own = object()
    assert patch_module._native_cache_kwargs({"cache": own, "x": 1}) == {"past_key_values": own, "x": 1}
    assert patch_module._native_cache_kwargs({"cache": None, "past_key_values": None}) == {}
    with pytest.raises(ValueError, match="both cache= and past_key_values="):
        patch_module._native_cache_kwargs({"cache": own, "past_key_values": own})
    monkeypatch.setattr(patch_module, "GENERATE_CACHE_KWARG", "cache")
    assert patch_module._native_cache_kwargs({"cache": own}) == {"cache": own}


def test_native_cache_keyword_is_what_generate_takes():
    import inspect

    model = tiny_model("llama")
    takes = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert patch_module.GENERATE_CACHE_KWARG == takes


def test_patching_twice_names_the_active_handle():
    model = tiny_model("llama")
    handle = patch_model(model, "xkv")
    state = model_state(model)
    with pytest.raises(ValueError, match=r"already patched: PatchHandle\(xkv on LlamaForCausalLM, active\); call "
                                         r"that handle's remove\(\) first"):
        patch_model(model, "dynamic")
    assert model_state(model) == state and active_patch(model) is handle
    handle.remove()
    handle.remove()  # idempotent
    with patch_model(model, "dynamic") as second:
        assert active_patch(model) is second


@pytest.mark.parametrize(
    "family, method, params, error, message",
    [
        ("deepseek_v2", "xkv", {}, ValueError, r"'xkv' does not support model_type='deepseek_v2'; supported model "
                                               r"types: llama, qwen2, mistral"),
        ("llama", "nope", {}, ValueError, r"unknown method 'nope'; known methods: dynamic, xkv, "),
        ("llama", "xkv", dict(rank=4), TypeError, r"no parameter 'rank'; allowed parameters: group_size, rank_k"),
        ("llama", "xkv", dict(window=-3), ValueError, r"window=-3 is out of range; allowed: int >= 0"),
        ("llama", "xkv", dict(group_size=3), ValueError, r"group_size=3 does not divide the 4 full-attention layers"),
    ],
)
def test_bad_patch_changes_nothing(family, method, params, error, message):
    model = tiny_model(family)
    state = model_state(model)
    with pytest.raises(error, match=message):
        patch_model(model, method, **params)
    assert model_state(model) == state and active_patch(model) is None


def test_patch_needs_a_generative_model():
    with pytest.raises(TypeError, match="model must be a transformers model with generate"):
        patch_model(torch.nn.Linear(2, 2), "dynamic")


@pytest.fixture
def counting_method():
    """A method whose install step replaces every attention forward with a counting wrapper."""
    seen = {"calls": 0}

    def install(model, handle, fail_after=None):
        for number, layer in enumerate(model.model.layers):
            if fail_after is not None and number == fail_after:
                raise KeyboardInterrupt  # an interrupt in the middle of installing
            stock = type(layer.self_attn).forward

            def counted(self, *args, _stock=stock, **kwargs):
                seen["calls"] += 1
                return _stock(self, *args, **kwargs)

            replace_forward(layer.self_attn, counted, handle)

    register_method("counting", summary="test", families=("llama",), install=install,
                    build=lambda m, fail_after=None: DynamicCache(config=m.config),
                    params=[Param("fail_after", None, "interrupt install", (Range(int, low=0),), none_ok=True)])
    yield seen
    registry._METHODS.pop("counting", None)


def test_install_step_changes_forwards_and_remove_restores_them(counting_method):
    model = tiny_model("llama")
    ids = prompt_ids(10, seed=8)
    state, reference = model_state(model), run_generate(model, ids)
    with patch_model(model, "counting"):
        assert_same_outputs(run_generate(model, ids), reference)
        assert counting_method["calls"] == 4 * 5  # 4 layers, 5 forward passes
    assert model_state(model) == state
    assert_same_outputs(run_generate(model, ids), reference)
    assert counting_method["calls"] == 20


def test_interrupted_install_leaves_the_model_unpatched(counting_method):
    model = tiny_model("llama")
    state = model_state(model)
    with pytest.raises(KeyboardInterrupt):
        patch_model(model, "counting", fail_after=2)
    assert model_state(model) == state and active_patch(model) is None


def test_handle_is_a_plain_undo_record():
    target = type("Target", (), {})()
    handle = PatchHandle(description="manual")
    patch_module.set_attribute(target, "x", 1, handle)
    assert target.x == 1 and repr(handle) == "PatchHandle(manual, active)"
    handle.remove()
    assert not hasattr(target, "x") and repr(handle) == "PatchHandle(manual, removed)"


@pytest.mark.slow
def test_smollm2_chat_pipeline_with_xkv(smollm2):
    """The real model through a chat pipeline that never mentions kvcompress: the patched call runs on an
    XKVCache much smaller than the stock cache of the same tokens; remove() restores the model's state.
    (Bit-for-bit equality after remove() is checked on the tiny models above, where it is cheap.)"""
    model, tokenizer = smollm2
    facts = " ".join(f"Item {i} is stored in room {i * 7 % 31}." for i in range(32))
    chat = [{"role": "user", "content": f"{facts} In which room is item 12 stored?"}]
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    state = model_state(model)
    with patch_model(model, "xkv", rank_k=0.0625, rank_v=0.125, window=16) as handle:
        answer = pipe(chat, max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
        cache = handle.last_cache
        assert type(cache).__name__ == "XKVCache" and handle.caches_made == 1
        tokens = cache.get_seq_length()
        assert tokens > 350  # long enough that the factors' fixed cost is repaid
        exact_bytes = 30 * 2 * tokens * 3 * 64 * 4  # what DynamicCache holds for these tokens (fp32)
        assert cache.nbytes() == cache.expected_nbytes() < 0.5 * exact_bytes
    assert answer.strip()
    assert model_state(model) == state and active_patch(model) is None


def test_mla_patch_installs_absorbed_attention_and_removes_it():
    """patch_model(model, 'mla') installs the absorbed attention (its decode steps take that path) and the
    MLALatentCache together; remove() takes both away."""
    from kvcompress.mla import mla_attention_modules

    model = tiny_model("deepseek_v2")
    ids = prompt_ids(24, seed=9)
    reference = run_generate(model, ids)
    with patch_model(model, "mla", max_absorbed_tokens=4) as handle:
        got = run_generate(model, ids)
        states = [getattr(m, "kvcompress_mla") for m in mla_attention_modules(model)]
        assert states and all(s.expanded_calls == 1 and s.absorbed_calls == 4 for s in states)  # prefill, 4 steps
        assert type(handle.last_cache).__name__ == "MLALatentCache"
    assert torch.equal(got.sequences, reference.sequences)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(got.logits, reference.logits))
    assert not any(hasattr(m, "kvcompress_mla") for m in mla_attention_modules(model))
    assert_same_outputs(run_generate(model, ids), reference)


def test_deepcopy_of_a_patched_model_is_refused_and_fine_after_remove():
    import copy

    model = tiny_model("llama")
    handle = patch_model(model, "dynamic")
    with pytest.raises(TypeError, match=r"cannot be copied: copy.deepcopy a model before patching it"):
        copy.deepcopy(model)
    handle.remove()
    clone = copy.deepcopy(model)
    with patch_model(clone, "xkv"):
        assert active_patch(model) is None


def test_xkv_patch_installs_fused_decode_and_matches_unpatched_cache():
    from kvcompress.xkv import XKV_ATTENTION_PREFIX, XKVCache

    model = tiny_model("llama")
    ids = torch.randint(3, 160, (2, 120), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding on one row
    params = SHORT_PROMPT_PARAMS["xkv"]
    plain = XKVCache(model.config, **params)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=plain)
    before = model.config._attn_implementation
    with patch_model(model, "xkv", **params) as handle:
        assert model.config._attn_implementation == XKV_ATTENTION_PREFIX + before
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert any(g.segments for g in handle.last_cache.groups)  # the factored path had something to read
    assert model.config._attn_implementation == before
    assert torch.equal(got, want)
