"""A converted model saved as a standard DeepSeek-V3 checkpoint: plain ``from_pretrained`` (no remote code)
gives the same logits, the same greedy tokens, and works with the MLA latent cache and absorbed decode."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from test_transmla import cache_kwarg, sharp_model, tokens
from kvcompress.mla import MLALatentCache, patch_mla
from kvcompress.transmla import calibration_text, convert_gqa_to_mla, save_converted
from kvcompress.transmla.checkpoint import INFO_FILE

GREEDY = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
SETTINGS = {"lossless": {}, "small": {"kv_lora_rank": 20, "rope_dim": 8}}


@pytest.fixture(scope="module")
def calibration():
    return tokens(batch=4, length=96, seed=5)


def convert(family, setting, calibration):
    return convert_gqa_to_mla(sharp_model(family), calibration=calibration, progress=False, **SETTINGS[setting])


def latent_generate(model, ids):
    """Greedy tokens with the latent cache and absorbed decode on every step after the prompt."""
    with patch_mla(model, max_absorbed_tokens=1):
        return model.generate(ids, **GREEDY, **{cache_kwarg(model): MLALatentCache(model.config)})


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: the query-bias (q_lora anchor) path
@pytest.mark.parametrize("setting", SETTINGS)
def test_saved_checkpoint_loads_with_plain_from_pretrained(tmp_path, family, setting, calibration):
    converted = convert(family, setting, calibration)
    assert save_converted(converted, tmp_path) == tmp_path
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert info["kv_lora_rank"] == converted.config.kv_lora_rank and info["lossless"] == (setting == "lossless")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "DeepseekV3ForCausalLM"
    # The per-slot RoPE frequencies come back from the config's longrope table, bit for bit.
    assert torch.equal(loaded.model.rotary_emb.inv_freq, converted.model.rotary_emb.inv_freq)
    ids = tokens(batch=2, length=40, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, converted(ids).logits, atol=1e-5, rtol=0)
    prompt = tokens(batch=1, length=16, seed=4)
    expected = converted.generate(prompt, **GREEDY)
    assert torch.equal(loaded.generate(prompt, **GREEDY), expected)
    for model in (converted, loaded):
        model.config._attn_implementation = "sdpa"
    assert torch.equal(latent_generate(loaded, prompt), latent_generate(converted, prompt))


def test_plain_save_pretrained_round_trips_too(tmp_path, calibration):
    converted = convert("llama", "small", calibration)
    converted.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokens(batch=1, length=24, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, converted(ids).logits, atol=1e-5, rtol=0)


def test_bfloat16_conversion_saves_and_loads_in_bfloat16(tmp_path):
    converted = convert_gqa_to_mla(sharp_model("llama", dtype=torch.bfloat16), progress=False)
    save_converted(converted, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    ids = tokens(batch=1, length=24, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted(ids).logits)


def test_refuses_models_that_are_not_converted(tmp_path, calibration):
    source = sharp_model("llama")
    with pytest.raises(TypeError, match="DeepseekV3ForCausalLM made by convert_gqa_to_mla.*LlamaForCausalLM"):
        save_converted(source, tmp_path / "a")
    converted = convert("llama", "small", calibration)
    converted.save_pretrained(tmp_path / "plain")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")  # a DeepSeek-V3 model, but no info
    with pytest.raises(TypeError, match="without transmla_info.*save_pretrained"):
        save_converted(loaded, tmp_path / "b")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        save_converted(converted, 3)
    with pytest.raises(TypeError, match="tokenizer must be None or have save_pretrained"):
        save_converted(converted, tmp_path / "c", tokenizer=object())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path must be a directory"):
        save_converted(converted, tmp_path / "file")
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))  # refused before writing


def test_round_trip_check_catches_a_config_that_does_not_read_back(tmp_path, calibration, monkeypatch):
    converted = convert("llama", "small", calibration)
    real_save = type(converted).save_pretrained

    def save_with_wrong_rope(self, path, **kwargs):
        real_save(self, path, **kwargs)
        config = json.loads((path / "config.json").read_text())
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        (path / "config.json").write_text(json.dumps(config))

    monkeypatch.setattr(type(converted), "save_pretrained", save_with_wrong_rope)
    with pytest.raises(RuntimeError, match="does not round-trip: rope_parameters reads back"):
        save_converted(converted, tmp_path)


def test_round_trip_check_catches_missing_tensors(tmp_path, calibration, monkeypatch):
    from safetensors.torch import load_file, save_file

    converted = convert("llama", "small", calibration)
    real_save = type(converted).save_pretrained

    def save_without_an_anchor(self, path, **kwargs):
        real_save(self, path, **kwargs)
        file = next(path.glob("*.safetensors"))
        tensors = load_file(str(file))
        del tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.bias"]
        save_file(tensors, str(file), metadata={"format": "pt"})

    monkeypatch.setattr(type(converted), "save_pretrained", save_without_an_anchor)
    with pytest.raises(RuntimeError, match="tensors missing.*kv_a_proj_with_mqa.bias"):
        save_converted(converted, tmp_path)


@pytest.mark.slow
def test_smollm2_lossless_checkpoint_round_trip(tmp_path, smollm2):
    model, tokenizer = smollm2
    converted = convert_gqa_to_mla(model, progress=False)
    save_converted(converted, tmp_path, tokenizer=tokenizer)
    assert AutoConfig.from_pretrained(tmp_path).tie_word_embeddings == converted.config.tie_word_embeddings
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokenizer(calibration_text("heldout")[:800], return_tensors="pt")["input_ids"][:, :96]
    with torch.no_grad():
        got, expected = loaded(ids).logits, converted(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))  # greedy generation is covered on tiny models
    from transformers import AutoTokenizer

    question = "What is the capital of France?"
    assert AutoTokenizer.from_pretrained(tmp_path)(question)["input_ids"] == tokenizer(question)["input_ids"]
