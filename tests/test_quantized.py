"""The ``quantized`` peer (transformers' QuantizedCache): spec errors, bytes against a hand count, and
logits against the stock DynamicCache on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvcompress import CountedQuantizedCache, QuantizedParams, make_cache
from kvcompress.bench.spec import parse_method_specs
from kvcompress.quantized import backend_available, held_nbytes

from conftest import tiny_config, tiny_model

needs_hqq = pytest.mark.skipif(not backend_available("hqq"), reason="hqq not installed (pip install hqq)")
needs_quanto = pytest.mark.skipif(not backend_available("quanto"), reason="optimum-quanto not installed")
HEAD_DIM = 16  # tiny_config: hidden 64 / 4 heads


def test_specs_parse_and_bad_parameters_name_the_allowed_values():
    specs = parse_method_specs("dynamic,quantized:backend=quanto:nbits=4,quantized:backend=hqq:nbits=2")
    assert [(s.name, s.params) for s in specs] == [
        ("dynamic", {}), ("quantized", {"backend": "quanto", "nbits": 4}),
        ("quantized", {"backend": "hqq", "nbits": 2})]
    with pytest.raises(ValueError, match=r"nbits=8 is not supported by backend='quanto'; allowed: one of 2, 4"):
        parse_method_specs("quantized:backend=quanto:nbits=8")
    with pytest.raises(ValueError, match=r"backend='fp16' is out of range; allowed: one of 'quanto', 'hqq'"):
        parse_method_specs("quantized:backend=fp16")
    with pytest.raises(ValueError, match=r"nbits=5 is out of range"):
        parse_method_specs("quantized:backend=hqq:nbits=5")
    with pytest.raises(ValueError, match=r"residual_length=0 is out of range; allowed: int >= 1"):
        parse_method_specs("quantized:residual_length=0")
    with pytest.raises(TypeError, match=r"no parameter 'bits'; allowed parameters: backend, nbits, q_group_size"):
        parse_method_specs("quantized:bits=4")
    with pytest.raises(ValueError, match=r"nbits=3 is not supported by backend='quanto'"):
        QuantizedParams(nbits=3)


@pytest.mark.skipif(not (backend_available("hqq") or backend_available("quanto")), reason="no backend installed")
def test_group_size_must_divide_the_head_dim():
    backend = "hqq" if backend_available("hqq") else "quanto"
    with pytest.raises(ValueError, match=rf"q_group_size=12 must divide the model's head dim \({HEAD_DIM}\)"):
        make_cache("quantized", tiny_config("llama"), backend=backend, q_group_size=12)


def test_a_missing_backend_package_is_named(monkeypatch):
    import kvcompress.quantized as Q

    monkeypatch.setattr(Q, "backend_available", lambda backend: False)
    with pytest.raises(ImportError, match=r"backend='hqq' needs the package 'hqq'.*pip install hqq"):
        make_cache("quantized", tiny_config("llama"), backend="hqq", nbits=2)


def test_held_nbytes_counts_inner_tensors_not_logical_shapes():
    t = torch.zeros(3, 5, dtype=torch.float16)
    assert held_nbytes(t) == 30
    assert held_nbytes((t, {"scale": torch.zeros(4), "shape": torch.Size([3, 5]), "nbits": 4}, None)) == 46


def _fill(cache, prompt: int, steps: int, seed: int = 0) -> None:
    """A prefill of ``prompt`` random tokens then ``steps`` one-token updates, on every layer."""
    g = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        layer.update(torch.randn(1, 2, prompt, HEAD_DIM, generator=g), torch.randn(1, 2, prompt, HEAD_DIM, generator=g))
        for _ in range(steps):
            layer.update(torch.randn(1, 2, 1, HEAD_DIM, generator=g), torch.randn(1, 2, 1, HEAD_DIM, generator=g))


def _hand_count(layers: int, quantized_tokens: int, residual_tokens: int, nbits: int, group: int) -> int:
    """Per layer and for keys and values alike: the packed integers (shapes chosen so that no packing
    padding occurs), one fp32 scale and one fp32 zero/shift per group, and the fp32 residual."""
    elements = 2 * quantized_tokens * HEAD_DIM  # batch 1, 2 KV heads
    packed = elements * nbits // 8
    scales = (elements // group) * 2 * 4
    residual = 2 * residual_tokens * HEAD_DIM * 4
    return layers * 2 * (packed + scales + residual)


@pytest.mark.parametrize("backend,nbits", [
    pytest.param("quanto", 4, marks=needs_quanto), pytest.param("quanto", 2, marks=needs_quanto),
    pytest.param("hqq", 2, marks=needs_hqq), pytest.param("hqq", 4, marks=needs_hqq),
    pytest.param("hqq", 8, marks=needs_hqq)])
def test_nbytes_is_the_hand_count(backend, nbits):
    config = tiny_config("llama")
    cache = make_cache("quantized", config, backend=backend, nbits=nbits, q_group_size=16, residual_length=4)
    assert isinstance(cache, CountedQuantizedCache) and cache.nbytes() == 0
    _fill(cache, prompt=24, steps=2)
    layer = cache.layers[0]
    residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
    assert residual == 2  # the prompt was quantised whole; both decoded tokens wait in the residual
    assert cache.get_seq_length() == 26
    assert cache.nbytes() == _hand_count(config.num_hidden_layers, 24, residual, nbits, 16)
    # a quarter of fp32 per element at 8 bits, an eighth at 4: well below the stock cache's bytes
    stock = config.num_hidden_layers * 2 * (2 * 26 * HEAD_DIM * 4)
    assert cache.nbytes() < stock


def _teacher_forced_logits(model, cache, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the prefill's last position, then of each of ``tokens`` fed one at a time."""
    out = [model(prompt, past_key_values=cache).logits[0, -1]]
    for token in tokens[:-1]:
        out.append(model(token.view(1, 1), past_key_values=cache).logits[0, -1])
    return torch.stack(out)


@torch.inference_mode()
def _errors(specs: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    model = tiny_model("llama")
    config = model.config
    prompt = torch.randint(3, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    stock = model.generate(prompt, past_key_values=DynamicCache(config=config), max_new_tokens=24,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, 40:]
    reference = _teacher_forced_logits(model, DynamicCache(config=config), prompt, stock)
    others = [_teacher_forced_logits(model, make_cache("quantized", config, q_group_size=16, residual_length=4, **s),
                                     prompt, stock) for s in specs]
    return stock, reference, others


@needs_hqq
def test_hqq_8bit_generates_what_the_dynamic_cache_does():
    model = tiny_model("llama")
    config = model.config
    prompt = torch.randint(3, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    stock = model.generate(prompt, past_key_values=DynamicCache(config=config), **kwargs)
    cache = make_cache("quantized", config, backend="hqq", nbits=8, q_group_size=16, residual_length=4)
    ours = model.generate(prompt, past_key_values=cache, **kwargs)
    assert torch.equal(ours, stock)  # 24 greedy tokens, with 5 re-quantisations of every layer on the way
    assert cache.get_seq_length() == 40 + 23


@needs_hqq
def test_hqq_logits_match_the_dynamic_cache_within_the_bits_tolerance():
    _, reference, (q8, q4, q2) = _errors([dict(backend="hqq", nbits=b) for b in (8, 4, 2)])
    # the prefill's attention reads the exact states: the first logits are the stock ones, bit for bit
    for q in (q8, q4, q2):
        assert torch.equal(q[0], reference[0])
    errors = [(q - reference).abs().max().item() for q in (q8, q4, q2)]
    scale = reference.std().item()
    # measured on this model (logit std 0.165): 6.2e-4, 1.2e-2, 6.6e-2 (0.004, 0.075, 0.40 std)
    assert errors[0] < 0.02 * scale, errors
    assert errors[0] < errors[1] < errors[2], errors
    assert errors[1] < 0.3 * scale and errors[2] < scale, errors


@needs_quanto
def test_quanto_logits_match_the_dynamic_cache_within_the_bits_tolerance():
    _, reference, (q4, q2) = _errors([dict(backend="quanto", nbits=b) for b in (4, 2)])
    for q in (q4, q2):
        assert torch.equal(q[0], reference[0])
    errors = [(q - reference).abs().max().item() for q in (q4, q2)]
    scale = reference.std().item()
    # measured (logit std 0.165): 1.2e-2 and 7.6e-2 (0.075 and 0.46 std)
    assert errors[0] < errors[1] < scale, errors
    assert errors[0] < 0.3 * scale, errors
