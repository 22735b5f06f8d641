"""TransMLA conversion levers: which RoPE frequencies are kept (``rope_selection``, ``rope_context``), and
calibration on more and longer text (the ``stdlib`` split, every window of a text, long sequences)."""

from __future__ import annotations

import pytest
import torch

from test_transmla import sharp_model, tokens
from kvcompress.transmla import calibration_text, calibration_tokens, convert_gqa_to_mla
from kvcompress.transmla.rorope import ROPE_SELECTIONS, _block_weights


class CharTokenizer:
    """One token per character (ids 3 .. 159), enough to cut calibration windows from the built-in text."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return {"input_ids": torch.tensor([[3 + ord(c) % 157 for c in text]])}


@pytest.fixture(scope="module")
def calibration():
    return tokens(batch=4, length=64, seed=5)


def slot_frequencies(source, counts):
    inv_freq = source.model.rotary_emb.inv_freq
    return torch.cat([inv_freq[b].repeat(n) for b, n in enumerate(counts)])


@pytest.mark.parametrize("selection", ROPE_SELECTIONS)
def test_every_rope_selection_gives_a_consistent_rope_table(calibration, selection):
    source = sharp_model("llama")  # 2 KV heads of dim 16: 8 frequency blocks of 2 components
    converted = convert_gqa_to_mla(source, kv_lora_rank=17, rope_dim=8, calibration=calibration,
                                   rope_selection=selection, progress=False)
    counts = converted.transmla_info["rope_slots_per_block"]
    assert sum(counts) == 4 and all(0 <= n <= 2 for n in counts)
    assert converted.transmla_info["rope_selection"] == selection
    torch.testing.assert_close(converted.model.rotary_emb.inv_freq, slot_frequencies(source, counts), rtol=1e-6, atol=0)
    if selection == "frequency":  # the fastest-turning blocks, whole
        assert counts == [2, 2, 0, 0, 0, 0, 0, 0]


def test_rotation_over_a_long_context_is_energy_alone(calibration):
    """Over a context much longer than every period, 1 - sinc(w L) -> 1: the allotment is by energy; a short
    context makes low frequencies (which barely turn within it) lose their slots."""
    source = sharp_model("llama")
    info = {}
    for name, kwargs in {"energy": {"rope_selection": "energy"},
                         "long": {"rope_selection": "rotation", "rope_context": 10**9},
                         "short": {"rope_selection": "rotation", "rope_context": 2}}.items():
        converted = convert_gqa_to_mla(source, kv_lora_rank=17, rope_dim=8, calibration=calibration,
                                       progress=False, **kwargs)
        info[name] = converted.transmla_info["rope_slots_per_block"]
    assert info["long"] == info["energy"]
    assert info["short"] != info["energy"]
    # with L = 2 the weight ~ (w L)^2 / 6 grows with the frequency: the slowest blocks get nothing
    assert info["short"][-3:] == [0, 0, 0]


def test_position_weights_match_their_definitions():
    freq = torch.tensor([1.0, 0.1, 1e-3, 1e-6], dtype=torch.float32)
    L = 500
    t = torch.arange(1, L + 1, dtype=torch.float64)
    cos = torch.cos(freq.double()[:, None] * t)
    torch.testing.assert_close(_block_weights(freq, "log_rotation", L), ((1 - cos) / t).sum(1) / (1 / t).sum())
    # the uniform average of 1 - cos(w t) over [0, L], against a fine midpoint rule
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) * (L / 200_000)
    uniform = (1 - torch.cos(freq.double()[:, None] * grid)).mean(1)
    torch.testing.assert_close(_block_weights(freq, "rotation", L), uniform, rtol=1e-6, atol=1e-12)
    assert torch.equal(_block_weights(freq, "energy", L), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    ({"rope_selection": "random"}, r"rope_selection must be one of \('rotation', 'log_rotation', 'energy', 'frequency'\), got 'random'"),
    ({"rope_context": 0}, r"rope_context must be an int >= 1, got 0"),
    ({"rope_context": 2.5}, r"rope_context must be an int >= 1, got 2.5"),
])
def test_bad_rope_selection_arguments(calibration, kwargs, match):
    with pytest.raises(ValueError, match=match):
        convert_gqa_to_mla(sharp_model("llama"), kv_lora_rank=9, rope_dim=8, calibration=calibration,
                           progress=False, **kwargs)


def test_stdlib_text_is_large_deterministic_and_disjoint_from_the_other_splits():
    text = calibration_text("stdlib")
    assert len(text) > 500_000 and text == calibration_text("stdlib")
    other = calibration_text("calibration") + calibration_text("heldout")
    assert text[10_000:12_000] not in other and text[-2_000:] not in other


def test_every_window_and_long_windows_of_the_built_in_text():
    model, tokenizer = sharp_model("llama"), CharTokenizer()
    text = calibration_text("calibration")
    all_windows = calibration_tokens(model, tokenizer, None, 4096, progress=False)
    assert all_windows.shape == (len(text) // 4096, 4096)
    assert all_windows[1, 0] == 3 + ord(text[4096]) % 157
    with pytest.raises(ValueError, match=r"num_sequences=None .* needs a tokenizer"):
        calibration_tokens(model, None, None, 16, progress=False)
    with pytest.raises(ValueError, match=r"seq_len must be at most"):
        calibration_tokens(model, tokenizer, None, 10**8, progress=False)


def test_calibration_on_sequences_longer_than_the_training_context():
    """Long calibration windows (here 2 x 1536 tokens, beyond max_position_embeddings = 1024) work and
    count every token; with all keys kept the conversion stays exact whatever the calibration."""
    source = sharp_model("llama")
    long = calibration_tokens(source, CharTokenizer(), 2, 1536, progress=False)
    converted = convert_gqa_to_mla(source, calibration=long, progress=False)
    assert converted.transmla_info["calibration_tokens"] == 2 * 1536
    ids = tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, atol=2e-5, rtol=1e-4)
    lossy = convert_gqa_to_mla(source, kv_lora_rank=17, rope_dim=8, calibration=long, progress=False)
    assert all(0 < layer["kv_energy_kept"] < 1 for layer in lossy.transmla_info["layers"])
