"""TransMLA (GQA -> DeepSeek-V3 MLA conversion): exactness of the lossless setting against the source
model, the MLA cache/absorbed decode on converted models, the PCA maths, recovery training, bad input."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import tiny_model
from kvcompress.transmla import (
    calibration_text,
    calibration_tokens,
    convert_gqa_to_mla,
    distill_from_teacher,
    is_lossless,
    kv_elements_per_token,
)

FAMILIES = ["llama", "qwen2", "mistral"]


def sharp_model(family: str, seed: int = 0, **overrides):
    """A tiny random model whose attention is far from uniform (so RoPE and key order matter), with random
    q/k/v biases where the architecture has them."""
    model = tiny_model(family, seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(8.0)
            attn.k_proj.weight.mul_(8.0)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                if proj.bias is not None:
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=g) * 0.5)
    return model


def tokens(batch=2, length=48, seed=0, vocab=160):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_kwarg(model) -> str:
    """transformers 5.24 names the cache argument ``cache``, 5.17 ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def mean_kl(reference_logits, logits):
    return F.kl_div(logits.log_softmax(-1).flatten(0, 1), reference_logits.log_softmax(-1).flatten(0, 1),
                    log_target=True, reduction="batchmean").item()


@pytest.fixture(scope="module")
def calibration():
    return tokens(batch=4, length=96, seed=5)


# -- the lossless setting ------------------------------------------------------------------------------
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_reproduces_source_logits(family, interleave):
    source = sharp_model(family)
    ids = tokens()
    with torch.no_grad():
        expected = source(ids).logits
        # The check is not vacuous: other positions change these logits a lot.
        shifted = source(ids, position_ids=2 * torch.arange(ids.shape[1])[None].expand_as(ids)).logits
    assert (expected - shifted).abs().max() > 0.1 * expected.abs().max()
    converted = convert_gqa_to_mla(source, rope_interleave=interleave, progress=False)
    assert type(converted).__name__ == "DeepseekV3ForCausalLM"
    assert converted.config.first_k_dense_replace == converted.config.num_hidden_layers
    assert converted.transmla_info["lossless"]
    with torch.no_grad():
        got = converted(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # Same cache size as the source plus the one anchor entry per layer.
    layers = source.config.num_hidden_layers
    assert kv_elements_per_token(converted) == kv_elements_per_token(source) + layers


@pytest.mark.parametrize("kv_heads", [1, 4])  # MQA and plain multi-head attention are GQA's edge cases
def test_lossless_for_mqa_and_mha(kv_heads):
    source = sharp_model("llama", num_key_value_heads=kv_heads)
    ids = tokens()
    converted = convert_gqa_to_mla(source, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, atol=2e-5, rtol=1e-4)


def test_llama_with_attention_bias_uses_q_lora_anchor_and_stays_exact():
    source = sharp_model("llama", attention_bias=True)
    converted = convert_gqa_to_mla(source, progress=False)
    assert converted.config.q_lora_rank == source.config.hidden_size + 1  # the query bias needs the q path
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("basis", ["qk", "key"])
def test_rorope_rotation_with_calibration_is_still_exact(calibration, basis):
    """With calibration data the RoRoPE bases really mix heads (the paper's orthogonal key PCA, or our
    query-whitening basis with its inverse transpose on the queries); with every component keeping RoPE
    they must commute with RoPE exactly, and the full-rank latent PCA loses nothing."""
    source = sharp_model("qwen2")
    converted = convert_gqa_to_mla(source, calibration=calibration, rorope_basis=basis, progress=False)
    kv_a = converted.model.layers[0].self_attn.kv_a_proj_with_mqa.weight
    rope = kv_a[converted.config.kv_lora_rank :]
    k_proj = source.model.layers[0].self_attn.k_proj.weight
    assert not torch.allclose(rope.abs().sum(0), k_proj.abs().sum(0))  # not just a permutation of k_proj
    ids = tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, atol=2e-5, rtol=1e-4)


def test_lossless_greedy_generation_equals_source():
    source = sharp_model("mistral")
    converted = convert_gqa_to_mla(source, progress=False)
    ids = tokens(batch=1, length=12, seed=9)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(converted.generate(ids, **kw), source.generate(ids, **kw))


def test_source_model_is_not_modified(calibration):
    source = sharp_model("qwen2")
    source.train()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    convert_gqa_to_mla(source, kv_lora_rank=17, rope_dim=16, calibration=calibration, progress=False)
    assert source.training
    after = source.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- the MLA caches on converted models ----------------------------------------------------------------
@pytest.mark.parametrize("settings", [{}, {"kv_lora_rank": 17, "rope_dim": 8}, {"kv_lora_rank": 25, "rope_dim": 16, "freq_fold": 2}])
def test_mla_latent_cache_with_absorbed_decode_matches_dynamic_cache(settings, calibration):
    from kvcompress.mla import MLALatentCache, patch_mla

    source = sharp_model("qwen2")
    converted = convert_gqa_to_mla(source, calibration=calibration, progress=False, **settings)
    converted.config._attn_implementation = "sdpa"
    ids = tokens(batch=1, length=20, seed=11)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    stock = converted.generate(ids, **kw, **{cache_kwarg(converted): DynamicCache(config=converted.config)})
    with patch_mla(converted, max_absorbed_tokens=1) as handle:
        cache = MLALatentCache(converted.config)
        absorbed = converted.generate(ids, **kw, **{cache_kwarg(converted): cache})
        states = [getattr(m, "kvcompress_mla") for m in converted.modules() if hasattr(m, "kvcompress_mla")]
    assert not handle.active
    assert all(s.absorbed_calls > 0 for s in states)  # decode steps really took the absorbed path
    assert torch.equal(absorbed, stock)
    cfg = converted.config
    cached_tokens = absorbed.shape[1] - 1  # the last generated token is never fed back
    assert cache.nbytes() == cfg.num_hidden_layers * cached_tokens * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_cache_size_formula_and_compression_ratio(calibration):
    source = sharp_model("llama")  # 2 KV heads of dim 16: the source caches 2 * 32 = 64 numbers per token/layer
    assert kv_elements_per_token(source) == 4 * 64
    converted = convert_gqa_to_mla(source, kv_lora_rank=24, rope_dim=8, calibration=calibration, progress=False)
    assert kv_elements_per_token(converted) == 4 * (24 + 8)
    info = converted.transmla_info["cache_elements_per_token"]
    assert info == {"source": 256, "converted": 128}
    assert converted.config.qk_rope_head_dim == 8 and converted.config.kv_lora_rank == 24


# -- the maths of the lossy settings ---------------------------------------------------------------------
def test_value_latent_error_is_the_discarded_pca_energy(calibration):
    """rope_dim = all key dims (keys exact) and a smaller latent: the latent is a PCA of the values, so on the
    calibration activations ||V_hat - V||^2 / ||V||^2 equals the discarded eigenvalue share (Eckart-Young)."""
    source = sharp_model("qwen2")
    rank = 12  # latent directions; kv_lora_rank = rank + 1 (anchor)
    converted = convert_gqa_to_mla(source, kv_lora_rank=rank + 1, calibration=calibration, progress=False)
    layer = 1
    with torch.no_grad():
        x = source(calibration, output_hidden_states=True).hidden_states[layer]
        h = source.model.layers[layer].input_layernorm(x)
        attn_s = source.model.layers[layer].self_attn
        attn_c = converted.model.layers[layer].self_attn
        v = attn_s.v_proj(h).double()  # [B, T, G d]
        latent = attn_c.kv_a_layernorm(attn_c.kv_a_proj_with_mqa(h)[..., : attn_c.kv_lora_rank])
        kv = attn_c.kv_b_proj(latent).view(*h.shape[:2], attn_c.num_heads, -1)
        v_hat = kv[..., attn_c.qk_nope_head_dim :].double()  # [B, T, H, d]
    d, rep = 16, 2
    v_hat_groups = v_hat[:, :, ::rep].flatten(2)  # one query head per KV group
    error = (v_hat_groups - v).pow(2).sum() / v.pow(2).sum()
    kept = converted.transmla_info["layers"][layer]["kv_energy_kept"]
    assert 0.0 < 1 - kept < 0.9
    assert error.item() == pytest.approx(1 - kept, rel=1e-3, abs=1e-6)
    # heads of one group read the same values
    torch.testing.assert_close(v_hat[:, :, 0], v_hat[:, :, 1])
    assert v_hat.shape[-1] == d


def test_error_shrinks_as_the_cache_grows(calibration):
    source = sharp_model("llama")
    ids = tokens(seed=2)
    with torch.no_grad():
        reference = source(ids).logits
        kls = []
        for rank in (9, 25, 41):  # rope_dim 24 of 32 key dims: max kv_lora_rank = 64 - 24 + 1 = 41
            converted = convert_gqa_to_mla(source, kv_lora_rank=rank, rope_dim=24, calibration=calibration,
                                           progress=False)
            kls.append(mean_kl(reference, converted(ids).logits))
    assert kls[0] > kls[1] > kls[2] >= 0.0
    assert kls[0] > 1e-3  # the smallest cache really is lossy


def test_freq_fold_uses_geometric_mean_frequencies(calibration):
    source = sharp_model("llama")
    converted = convert_gqa_to_mla(source, rope_dim=16, calibration=calibration, freq_fold=2, progress=False)
    inv_freq = converted.model.rotary_emb.inv_freq
    src_freq = source.model.rotary_emb.inv_freq.double().view(-1, 2)
    folded = src_freq.log().mean(1).exp().float()
    counts = converted.transmla_info["rope_slots_per_block"]
    assert sum(counts) == 8 and len(counts) == 4
    expected = torch.cat([folded[b].repeat(n) for b, n in enumerate(counts)])
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)


def test_lossless_rope_table_is_bitwise_the_source_frequencies():
    source = sharp_model("llama")
    converted = convert_gqa_to_mla(source, progress=False)
    src = source.model.rotary_emb.inv_freq
    # every KV head keeps its own copy of every frequency
    assert torch.equal(converted.model.rotary_emb.inv_freq, src.repeat_interleave(2))


def test_bfloat16_conversion_keeps_float32_rope_frequencies():
    # A bfloat16 model's RoPE table stays float32 (as in the source and in a reloaded checkpoint); rounding
    # the per-slot frequencies to bfloat16 would move every rotation.
    converted = convert_gqa_to_mla(sharp_model("llama", dtype=torch.bfloat16), progress=False)
    reference = convert_gqa_to_mla(sharp_model("llama"), progress=False)
    assert converted.dtype == torch.bfloat16
    assert converted.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(converted.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_is_lossless():
    source = sharp_model("llama")
    assert is_lossless(source)
    assert is_lossless(source, kv_lora_rank=33, rope_dim=32)
    assert not is_lossless(source, rope_dim=16)
    assert not is_lossless(source, kv_lora_rank=20)
    assert not is_lossless(source, freq_fold=2)


# -- calibration and recovery ----------------------------------------------------------------------------
def test_calibration_text_splits_are_disjoint_and_deterministic():
    cal, held = calibration_text("calibration"), calibration_text("heldout")
    assert len(cal) > 100_000 and len(held) > 100_000
    assert cal == calibration_text() and cal[:2000] not in held


def test_sampled_calibration_is_deterministic_and_keeps_the_global_rng():
    model = tiny_model("llama")
    state = torch.random.get_rng_state()
    a = calibration_tokens(model, num_sequences=2, seq_len=16, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = calibration_tokens(model, num_sequences=2, seq_len=16, progress=False)
    c = calibration_tokens(model, num_sequences=2, seq_len=16, split="heldout", progress=False)
    assert a.shape == (2, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_recovery_distillation_reduces_kl(calibration):
    source = sharp_model("llama")
    converted = convert_gqa_to_mla(source, kv_lora_rank=9, rope_dim=8, calibration=calibration, progress=False)
    with torch.no_grad():
        before = mean_kl(source(calibration).logits, converted(calibration).logits)
    frozen = converted.model.embed_tokens.weight.clone()
    losses = distill_from_teacher(converted, source, calibration, steps=8, lr=1e-3, batch_size=4, progress=False)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    with torch.no_grad():
        after = mean_kl(source(calibration).logits, converted(calibration).logits)
    assert after < 0.7 * before
    assert losses[-1] < losses[0]
    assert not converted.training
    assert all(p.requires_grad for p in converted.parameters())
    assert torch.equal(frozen, converted.model.embed_tokens.weight)  # only attention projections trained


def test_convert_with_recovery_steps_records_losses(calibration):
    source = sharp_model("mistral")
    converted = convert_gqa_to_mla(source, kv_lora_rank=9, rope_dim=8, calibration=calibration,
                                   recovery_steps=2, progress=False)
    assert len(converted.transmla_info["recovery_losses"]) == 2


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kv_lora_rank": 1}, r"kv_lora_rank must be an int in \[2, .* = 33\]"),
        ({"kv_lora_rank": 34}, r"kv_lora_rank must be an int in \[2, .* = 33\]"),
        ({"kv_lora_rank": 10.0}, r"kv_lora_rank"),
        ({"rope_dim": 7}, r"rope_dim must be an even int in \[2, .* = 32\]"),
        ({"rope_dim": 34}, r"rope_dim must be an even int in \[2, .* = 32\]"),
        ({"rope_dim": 0}, r"rope_dim"),
        ({"freq_fold": 3}, r"freq_fold must divide head_dim/2 = 8: allowed \[1, 2, 4, 8\]"),
        ({"recovery_steps": -1}, r"recovery_steps must be an int >= 0"),
        ({"rorope_basis": "pca"}, r"rorope_basis must be 'qk' or 'key'"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        convert_gqa_to_mla(sharp_model("llama"), progress=False, **kwargs)


def test_unsupported_models_and_inputs():
    with pytest.raises(TypeError, match=r"supports GQA models of type \('llama', 'mistral', 'qwen2'\)"):
        convert_gqa_to_mla(tiny_model("deepseek_v3"), progress=False)
    with pytest.raises(TypeError, match="must be a transformers causal LM"):
        convert_gqa_to_mla("llama", progress=False)
    with pytest.raises(TypeError, match="float16"):
        convert_gqa_to_mla(tiny_model("llama", dtype=torch.float16), progress=False)
    odd = tiny_model("llama")
    odd.config.head_dim = 15  # transformers itself refuses to build one; a hand-edited config must not slip by
    with pytest.raises(ValueError, match="head_dim must be even for RoPE pairs, got head_dim=15"):
        convert_gqa_to_mla(odd, progress=False)
    with pytest.raises(TypeError, match="calibration must be None"):
        convert_gqa_to_mla(tiny_model("llama"), rope_dim=8, calibration="some text", progress=False)
    with pytest.raises(ValueError, match=r"calibration token ids must be in \[0, vocab_size=160\)"):
        convert_gqa_to_mla(tiny_model("llama"), rope_dim=8, calibration=torch.full((1, 8), 500), progress=False)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        distill_from_teacher(tiny_model("llama"), tiny_model("llama"), tokens(), steps=0)
    with pytest.raises(ValueError, match="split must be"):
        calibration_text("train")


class WorkStarted(Exception):
    """Raised by a stand-in for the first expensive stage: validation must come before it."""


def _no_work(*args, **kwargs):
    raise WorkStarted


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"recovery_lr": math.nan, "recovery_steps": 2}, r"recovery_lr must be a finite float > 0, got nan"),
        ({"recovery_lr": math.inf, "recovery_steps": 2}, r"recovery_lr must be a finite float > 0, got inf"),
        ({"recovery_lr": -1e-3, "recovery_steps": 2}, r"recovery_lr must be a finite float > 0, got -0.001"),
        ({"recovery_lr": 0.0, "recovery_steps": 2}, r"recovery_lr must be a finite float > 0"),
        ({"recovery_lr": True, "recovery_steps": 2}, r"recovery_lr must be a finite float > 0, got True"),
        ({"recovery_lr": "1e-4", "recovery_steps": 2}, r"recovery_lr must be a finite float > 0"),
        ({"recovery_lr": math.nan}, r"recovery_lr must be a finite float > 0"),  # even without recovery
        ({"recovery_steps": 1.5}, r"recovery_steps must be an int >= 0, got 1.5"),
        ({"recovery_steps": True}, r"recovery_steps must be an int >= 0, got True"),
        ({"balance_kv": "yes"}, r"balance_kv must be True or False, got 'yes'"),
        ({"rope_interleave": 1}, r"rope_interleave must be True or False, got 1"),
        ({"progress": None}, r"progress must be True or False, got None"),
        ({"kv_lora_rank": 50, "rope_dim": 16}, r"kv_lora_rank must be an int in \[2, .* = 49\]"),
        ({"calibration": torch.zeros(2, 8)}, r"calibration must be a non-empty 1-D or 2-D integer tensor .* dtype torch.float32"),
        ({"calibration": torch.full((1, 8), -1)}, r"calibration token ids must be in \[0, vocab_size=160\)"),
    ],
)
def test_bad_convert_arguments_are_rejected_before_any_work(monkeypatch, calibration, kwargs, match):
    import kvcompress.transmla.convert as convert_module

    for stage in ("_input_moments", "calibration_tokens", "_rorope_basis", "distill_from_teacher"):
        monkeypatch.setattr(convert_module, stage, _no_work)
    kwargs = {"kv_lora_rank": 9, "rope_dim": 8, "calibration": calibration, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        convert_gqa_to_mla(sharp_model("llama"), **kwargs)


def test_bad_tokenizer_is_rejected_before_sampling(monkeypatch):
    import kvcompress.transmla.convert as convert_module

    monkeypatch.setattr(convert_module, "_input_moments", _no_work)
    with pytest.raises(TypeError, match=r"tokenizer must be None or a callable tokenizer, got int"):
        convert_gqa_to_mla(sharp_model("llama"), kv_lora_rank=9, rope_dim=8, tokenizer=42, progress=False)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"lr": math.nan}, ValueError, r"lr must be a finite float > 0, got nan"),
        ({"lr": math.inf}, ValueError, r"lr must be a finite float > 0, got inf"),
        ({"lr": -1e-3}, ValueError, r"lr must be a finite float > 0, got -0.001"),
        ({"lr": True}, ValueError, r"lr must be a finite float > 0, got True"),
        ({"temperature": math.inf}, ValueError, r"temperature must be a finite float > 0, got inf"),
        ({"temperature": math.nan}, ValueError, r"temperature must be a finite float > 0, got nan"),
        ({"temperature": 0}, ValueError, r"temperature must be a finite float > 0, got 0"),
        ({"steps": 0}, ValueError, r"steps must be an int >= 1, got 0"),
        ({"steps": 2.0}, ValueError, r"steps must be an int >= 1, got 2.0"),
        ({"batch_size": 0}, ValueError, r"batch_size must be an int >= 1, got 0"),
        ({"progress": "no"}, ValueError, r"progress must be True or False, got 'no'"),
        ({"tokens": "some text"}, TypeError, r"^tokens must be a LongTensor of token ids"),
        ({"tokens": torch.zeros(2, 8)}, ValueError, r"^tokens must be a non-empty 1-D or 2-D integer tensor .* dtype torch.float32"),
        ({"tokens": torch.full((1, 8), 160)}, ValueError, r"tokens token ids must be in \[0, vocab_size=160\), got ids in \[160, 160\]"),
        ({"tokens": [torch.arange(4), torch.arange(5)]}, ValueError,
         r"tokens: the 1-D token tensors of the list must have equal lengths, got \[4, 5\]"),
        ({"student": "model"}, TypeError, r"student must be a causal LM \(torch.nn.Module\), got str"),
        ({"teacher": None}, TypeError, r"teacher must be a causal LM \(torch.nn.Module\), got NoneType"),
        ({"teacher": "student"}, ValueError, r"student and teacher must be two different models"),
        ({"teacher": tiny_model("llama", vocab_size=200)}, ValueError,
         r"student and teacher must share a vocabulary: vocab_size 160 and 200"),
    ],
)
def test_bad_distill_arguments_are_rejected_before_any_work(kwargs, error, match):
    student, teacher = tiny_model("llama", seed=1), tiny_model("llama")
    teacher.register_forward_pre_hook(_no_work)
    student.register_forward_pre_hook(_no_work)
    flags = [p.requires_grad for p in student.parameters()]
    args = {"student": student, "teacher": teacher, "tokens": tokens(), "steps": 2, "progress": False} | kwargs
    if args["teacher"] == "student":
        args["teacher"] = student
    with pytest.raises(error, match=match):
        distill_from_teacher(**args)
    assert not student.training and flags == [p.requires_grad for p in student.parameters()]


def test_distillation_refuses_a_teacher_sharing_parameters_with_the_student():
    student, teacher = tiny_model("llama", seed=1), tiny_model("llama")
    student.model.embed_tokens = teacher.model.embed_tokens
    before = teacher.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match=r"student and teacher must share no parameters .*; 1 shared"):
        distill_from_teacher(student, teacher, tokens(), steps=1, progress=False)
    assert torch.equal(before, teacher.model.embed_tokens.weight)


def test_sampled_calibration_rejects_an_unknown_split():
    with pytest.raises(ValueError, match=r"split must be one of \('calibration', 'heldout', 'stdlib'\), got 'train'"):
        calibration_tokens(tiny_model("llama"), num_sequences=1, seq_len=4, split="train", progress=False)


def test_distillation_runs_the_teacher_in_eval_mode_and_restores_its_mode(calibration):
    """A teacher left in training mode (dropout) must still give deterministic targets."""
    teacher = sharp_model("llama", attention_dropout=0.5)
    student = convert_gqa_to_mla(teacher, kv_lora_rank=9, rope_dim=8, calibration=calibration, progress=False)
    teacher.train()
    modes = []
    teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    distill_from_teacher(student, teacher, calibration, steps=2, progress=False)
    assert modes == [False, False] and teacher.training


# -- progress and interruption -------------------------------------------------------------------------
def test_progress_bars_show_and_can_be_turned_off(capsys, calibration):
    source = sharp_model("llama")
    bars = ("sampling calibration text", "calibration forward", "converting layers", "recovery distillation")

    calibration_tokens(source, num_sequences=1, seq_len=4)
    convert_gqa_to_mla(source, kv_lora_rank=9, rope_dim=8, calibration=calibration, recovery_steps=1)
    shown = capsys.readouterr().err
    assert all(bar in shown for bar in bars), shown
    assert "4/4" in shown and "3/3" in shown  # calibration rows, tokens sampled after BOS

    calibration_tokens(source, num_sequences=1, seq_len=4, progress=False)
    convert_gqa_to_mla(source, kv_lora_rank=9, rope_dim=8, calibration=calibration, recovery_steps=1, progress=False)
    assert capsys.readouterr().err == ""


def _source_snapshot(model, ids):
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    was_training = {name: m.training for name, m in model.named_modules()}
    model.eval()
    with torch.no_grad():
        generated = model.generate(ids, **kw)
    for name, m in model.named_modules():
        m.train(was_training[name])
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": was_training,
        "grad_flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "generated": generated,
    }


def _assert_unchanged(model, snapshot, ids):
    assert {name: m.training for name, m in model.named_modules()} == snapshot["modes"]
    assert {k: p.requires_grad for k, p in model.named_parameters()} == snapshot["grad_flags"]
    state = model.state_dict()
    assert state.keys() == snapshot["state"].keys()
    assert all(torch.equal(snapshot["state"][k], state[k]) for k in state)
    again = _source_snapshot(model, ids)
    assert torch.equal(again["generated"], snapshot["generated"])


@pytest.mark.parametrize("stage", ["sampling", "calibration", "rorope", "layers"])
def test_ctrl_c_during_conversion_leaves_the_source_unchanged(monkeypatch, calibration, stage):
    import kvcompress.transmla.convert as convert_module

    source = tiny_model("llama")
    source.train()
    source.model.layers[0].eval()  # mixed modes must come back as they were, not all train or all eval
    ids = tokens(batch=1, length=6, seed=4)
    snapshot = _source_snapshot(source, ids)
    rng = torch.random.get_rng_state()
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(stage)
        if len(calls) == 2:  # mid-way: one call went through
            raise KeyboardInterrupt

    handle = None
    if stage in ("sampling", "calibration"):
        handle = source.model.layers[1].register_forward_pre_hook(interrupt)
    else:
        name = "_rorope_basis" if stage == "rorope" else "_convert_layer"
        original = getattr(convert_module, name)
        monkeypatch.setattr(convert_module, name, lambda *a, **k: (interrupt(), original(*a, **k))[1])
    with pytest.raises(KeyboardInterrupt):
        convert_gqa_to_mla(source, kv_lora_rank=9, rope_dim=8, progress=False,
                           calibration=None if stage == "sampling" else calibration)
    assert len(calls) == 2
    if handle is not None:
        handle.remove()
    assert torch.equal(torch.random.get_rng_state(), rng)
    _assert_unchanged(source, snapshot, ids)


def test_ctrl_c_during_recovery_keeps_the_steps_done_and_the_source_unchanged(calibration):
    source = tiny_model("llama")
    source.train()
    ids = tokens(batch=1, length=6, seed=4)
    snapshot = _source_snapshot(source, ids)
    forwards = []

    def interrupt(module, args, kwargs):
        forwards.append(kwargs.get("output_hidden_states", False))
        recovery = [f for f in forwards if not f]  # calibration forwards ask for hidden states
        if len(recovery) == 3:
            raise KeyboardInterrupt

    handle = source.register_forward_pre_hook(interrupt, with_kwargs=True)
    with pytest.warns(UserWarning, match="recovery distillation interrupted after 2 of 5 steps"):
        converted = convert_gqa_to_mla(source, kv_lora_rank=9, rope_dim=8, calibration=calibration,
                                       recovery_steps=5, progress=False)
    handle.remove()
    assert len(converted.transmla_info["recovery_losses"]) == 2
    assert not converted.training and all(p.requires_grad for p in converted.parameters())
    _assert_unchanged(source, snapshot, ids)


# -- the real model ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_lossless_and_a_2x_smaller_cache(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(calibration_text("heldout")[:1500], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        reference = model(ids).logits
    lossless = convert_gqa_to_mla(model, progress=False)
    with torch.no_grad():
        got = lossless(ids).logits
    assert (got - reference).abs().max().item() < 2e-3 * reference.abs().max().item()
    assert torch.equal(got.argmax(-1), reference.argmax(-1))
    del lossless

    cal = calibration_tokens(model, tokenizer, num_sequences=2, seq_len=256, progress=False)
    small = convert_gqa_to_mla(model, kv_lora_rank=128, rope_dim=64, calibration=cal, progress=False)
    assert kv_elements_per_token(model) / kv_elements_per_token(small) == 2.0
    with torch.no_grad():
        logits = small(ids).logits
    nll_ref = F.cross_entropy(reference[0, :-1], ids[0, 1:]).item()
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    # Lossy without recovery training (docs/transmla.md: +0.7 nats on 512 held-out tokens), but still a
    # language model: far below the uniform guess's log(vocab) = 10.8 nats.
    assert math.isfinite(nll) and nll_ref < nll < nll_ref + 1.5
