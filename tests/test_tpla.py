"""TPLA (kvcompress.tpla): exactness where the maths says so (N = 1, one-token contexts, latents inside one
shard's coordinates, folded rotations), the per-shard error bound, measured per-shard bytes against the
formula, distributed (2 gloo processes) against simulated, and the error messages. Tiny random models."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from conftest import tiny_model
from kvcompress import make_cache, patch_model
from kvcompress.mla import MLALatentCache, absorbed_attention, patch_mla
from kvcompress.patch import GENERATE_CACHE_KWARG
from kvcompress.tpla import (TPLACache, calibration_latents, hadamard_rotation, patch_tpla, pca_rotation,
                             tpla_attention)

R, P, LAYERS = 32, 8, 4  # tiny config: kv_lora_rank, qk_rope_head_dim, layers


def prepare_model(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every kv_a_layernorm a non-trivial weight (random init leaves it at ones), so that folding the
    norm weight into kv_b_proj is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            norm = layer.self_attn.kv_a_layernorm
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
    return model


def tpla_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    return prepare_model(tiny_model("deepseek_v3", seed=seed, dtype=dtype, **overrides))


def prompt_batch(seed: int = 0, length: int = 24):
    """Two prompts, the second left-padded by 5 tokens."""
    ids = torch.randint(3, 160, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids, mask


def generate(model, ids, mask, cache, new_tokens: int = 8):
    out = model.generate(ids, attention_mask=mask, **{GENERATE_CACHE_KWARG: cache}, max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                         output_logits=True)
    return out.sequences, torch.stack(out.logits)


def mla_reference(model, ids, mask, new_tokens: int = 8):
    with patch_mla(model):
        return generate(model, ids, mask, MLALatentCache(model.config), new_tokens)


def tpla_run(model, ids, mask, num_shards, rotation, new_tokens: int = 8, **kwargs):
    with patch_tpla(model, num_shards=num_shards, rotation=rotation, **kwargs):
        cache = TPLACache(model.config, num_shards=num_shards, rotation=rotation)
        sequences, logits = generate(model, ids, mask, cache, new_tokens)
    return sequences, logits, cache


# -- exactness ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rotation", [None, "hadamard", "pca"])
def test_one_shard_equals_absorbed_mla(rotation):
    """N = 1 is absorbed MLA: same tokens, logits within fp32 rounding (left padding included)."""
    model = tpla_model()
    ids, mask = prompt_batch()
    ref_tokens, ref_logits = mla_reference(model, ids, mask)
    tokens, logits, _ = tpla_run(model, ids, mask, 1, rotation)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() < 1e-4


def decode_hidden(model, ids, cache, steps: int = 3) -> torch.Tensor:
    """Final hidden states (the model's dtype) of a prefill and ``steps`` greedy one-token decode forwards."""
    states = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, output_hidden_states=True)
        for _ in range(steps):
            states.append(out.hidden_states[-1][:, -1])
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, output_hidden_states=True)
    states.append(out.hidden_states[-1][:, -1])
    return torch.stack(states)


def test_rotation_is_folded_exactly_float64():
    """With N = 1 the rotation only changes rounding: in float64 the decode hidden states of none, Hadamard
    and PCA agree to 1e-10 (generate's logits are float32, so they are compared here instead)."""
    model = tpla_model(dtype=torch.float64, first_k_dense_replace=LAYERS)  # grouped MoE matmuls lack float64
    ids, _ = prompt_batch()
    ids = ids[:1]
    runs = []
    for rotation in (None, "hadamard", "pca"):
        with patch_tpla(model, num_shards=1, rotation=rotation):
            runs.append(decode_hidden(model, ids, TPLACache(model.config, num_shards=1, rotation=rotation)))
    assert runs[0].dtype == torch.float64
    for hidden in runs[1:]:
        assert (hidden - runs[0]).abs().max() < 1e-10


@pytest.mark.parametrize("num_shards", [2, 4])
def test_prefill_is_exact_mla(num_shards):
    """Prefill (more than max_absorbed_tokens new tokens) is exact MLA for any N: the first logits match."""
    model = tpla_model()
    ids, mask = prompt_batch(length=24)
    _, ref_logits = mla_reference(model, ids, mask, new_tokens=1)
    _, logits, _ = tpla_run(model, ids, mask, num_shards, "hadamard", new_tokens=1)
    assert (logits - ref_logits).abs().max() < 1e-4


@pytest.mark.parametrize("num_shards", [2, 4])
def test_one_token_context_is_exact(num_shards):
    """With a single cached token every shard's softmax is 1, so TPLA equals MLA for any N (a one-token
    prompt goes through the TPLA path with prefill="tpla")."""
    model = tpla_model()
    ids = torch.randint(3, 160, (2, 1), generator=torch.Generator().manual_seed(3))
    _, ref_logits = mla_reference(model, ids, None, new_tokens=1)
    _, logits, _ = tpla_run(model, ids, None, num_shards, None, new_tokens=1, prefill="tpla")
    assert (logits - ref_logits).abs().max() < 1e-4


def plant_low_rank_latent(model, rank: int, seed: int = 5) -> None:
    """Make each layer's latent rows of kv_a_proj rank ``rank``: every token's latent lies in one fixed
    ``rank``-dimensional subspace (trained latents are strongly low-rank; this is the extreme case)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.kv_a_proj_with_mqa.weight
            basis = torch.linalg.qr(torch.randn(R, rank, generator=generator, dtype=torch.float64))[0]
            w[:R] = (basis @ basis.T @ w[:R].double()).to(w.dtype)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_pca_is_exact_when_the_latent_fits_one_shard(num_shards):
    """If every latent lies in an r/N-dimensional subspace, PCA puts it all in shard 0 (the other shards
    hold zeros), shard 0's softmax sees the full score, and TPLA equals MLA; unrotated slices do not."""
    model = tpla_model()
    plant_low_rank_latent(model, R // num_shards)
    ids, mask = prompt_batch()
    ref_tokens, ref_logits = mla_reference(model, ids, mask)
    tokens, logits, cache = tpla_run(model, ids, mask, num_shards, "pca")
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() < 1e-4
    assert cache.layers[1].keys[:, 1:].abs().max() < 1e-5  # shards 1.. hold (numerically) nothing
    _, plain_logits, _ = tpla_run(model, ids, mask, num_shards, None)
    assert (plain_logits - ref_logits).abs().max() > 100 * (logits - ref_logits).abs().max()


def test_per_shard_attention_weights_obey_the_softmax_bound():
    """Shard i's logits differ from the exact ones by delta_t = -scale * (the other shards' latent score);
    hence a^i_t / a_t lies in [e^-w, e^w] with w = max delta - min delta, and each shard's output slice
    differs from the exact one by at most (e^w - 1) * max_t |z_t| per coordinate. Checked with planted
    outlier channels."""
    g = torch.Generator().manual_seed(0)
    batch, heads, tokens, n, width, p = 2, 3, 40, 4, 8, 4
    z = torch.randn(batch, n, tokens, width, dtype=torch.float64, generator=g)
    z[:, 1, :, 0] *= 20  # an outlier channel in shard 1
    k_rope = torch.randn(batch, 1, tokens, p, dtype=torch.float64, generator=g)
    q = torch.randn(batch, heads, 1, n * width, dtype=torch.float64, generator=g)
    q_rope = torch.randn(batch, heads, 1, p, dtype=torch.float64, generator=g)
    scale = 0.3
    out = tpla_attention(q, q_rope, z, k_rope.expand(-1, n, -1, -1), None, scale)
    full = z.permute(0, 2, 1, 3).reshape(batch, tokens, n * width)
    exact = absorbed_attention(q, q_rope, full, k_rope[:, 0], None, scale)
    partial = torch.einsum("bhsnw,bntw->bhsnt", q.view(batch, heads, 1, n, width), z)  # per-shard latent scores
    for i in range(n):
        delta = -scale * (partial.sum(3) - partial[:, :, :, i])  # [B, H, 1, T]
        w = delta.amax(-1) - delta.amin(-1)
        bound = (w.exp() - 1)[..., None] * z[:, i].abs().amax(1)[:, None, None, :]
        err = (out[..., i * width:(i + 1) * width] - exact[..., i * width:(i + 1) * width]).abs()
        assert (err <= bound + 1e-12).all()
    # one shard is absorbed attention itself
    assert torch.allclose(tpla_attention(q[..., :width], q_rope, z[:, :1], k_rope, None, scale),
                          absorbed_attention(q[..., :width], q_rope, z[:, 0], k_rope[:, 0], None, scale))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and Triton")
@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_gpu_tpla_attention_runs_the_kernel_per_shard(num_shards, monkeypatch):
    """DeepSeek-V3 widths (128 heads, r = 512, p = 64), bf16, ragged valid lengths: on CUDA tpla_attention
    is one launch of the decode kernel over all held shards (shard rows as batch rows, each r/N wide),
    and every shard's output slice equals that shard's own float32 reference attention."""
    from kvcompress.kernels import mla_decode

    calls = []
    forward = mla_decode._triton_forward
    monkeypatch.setattr(mla_decode, "_triton_forward", lambda *a, **kw: calls.append(tuple(a[2].shape)) or forward(*a, **kw))
    g = torch.Generator(device="cuda").manual_seed(num_shards)
    batch, heads, tokens, r, p = 2, 128, 777, 512, 64
    width = r // num_shards

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

    z, q, q_rope = rnd(batch, num_shards, tokens, width), rnd(batch, heads, 1, r), rnd(batch, heads, 1, p)
    k_rope = rnd(batch, 1, tokens, p).expand(-1, num_shards, -1, -1).contiguous()
    lengths = torch.tensor([tokens, 500], device="cuda")
    out = tpla_attention(q, q_rope, z, k_rope, None, 0.2, kv_lengths=lengths)
    assert calls == [(batch * num_shards, tokens, width)]
    for i in range(num_shards):
        cols = slice(i * width, (i + 1) * width)
        ref = mla_decode.mla_decode_attention_reference(q[..., cols], q_rope, z[:, i], k_rope[:, i], 0.2, kv_lengths=lengths)
        err = ((out[..., cols].double() - ref.double()).abs().max() / ref.double().abs().max()).item()
        assert torch.isfinite(out[..., cols]).all() and err <= 1e-2, (i, err)


# -- rotations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 32, 512])
def test_hadamard_is_orthogonal_and_spreads_every_channel_evenly(size):
    h = hadamard_rotation(size)
    assert torch.allclose(h.T @ h, torch.eye(size, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(size)))
    for n in (1, 2, 4):
        if size % n == 0:
            # z = H^T e_j: each shard's slice carries exactly 1/N of channel j's energy
            energy = (h.T ** 2).view(size, n, size // n).sum(-1)  # [channel, shard]
            assert torch.allclose(energy, torch.full_like(energy, 1 / n))


def test_hadamard_refuses_other_sizes():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_rotation(24)


def test_pca_rotation_orthogonal_sorted_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    q = pca_rotation(x)
    assert torch.allclose(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-12)
    energy = ((x @ q) ** 2).sum(0)
    assert (energy[:-1] >= energy[1:] - 1e-9).all()  # strongest direction first (shard 0)
    assert torch.equal(q, pca_rotation(x.clone()))


def test_calibration_latents_are_the_models_latents():
    """The PCA input is exactly the latent the model caches."""
    model = tpla_model()
    ids, _ = prompt_batch()
    latents = calibration_latents(model, ids)
    ref = MLALatentCache(model.config)
    with torch.no_grad():
        model(input_ids=ids, **{"past_key_values": ref})
    for layer, latent in zip(ref.layers, latents):
        assert torch.allclose(latent.view(2, ids.shape[1], R).float(), layer.latent[:, 0], atol=1e-6)


@pytest.mark.parametrize("rotation", ["hadamard", "pca"])
def test_rotation_exact_with_a_suppressed_giant_channel(rotation):
    """A latent channel 10^4 times larger than the rest with norm weight 0 (TransMLA's norm anchor) must not
    cost precision: the rotation acts on the weighted latent c, so N = 1 still equals MLA to fp32 rounding."""
    model = tpla_model()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.kv_a_proj_with_mqa.weight[R - 1] *= 1e4
            attn.kv_a_layernorm.weight[R - 1] = 0.0
    ids, mask = prompt_batch()
    ref_tokens, ref_logits = mla_reference(model, ids, mask)
    tokens, logits, _ = tpla_run(model, ids, mask, 1, rotation)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() < 1e-4


# -- memory --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_per_shard_bytes_measured_against_the_formula(num_shards):
    """Shard i holds, per layer and token, r/N latent values and the p RoPE values: measured from its
    tensors, it equals the formula from the config, and its latent part is exactly 1/N of MLA's."""
    model = tpla_model()
    ids, mask = prompt_batch()
    _, _, cache = tpla_run(model, ids, mask, num_shards, "hadamard")
    mla = MLALatentCache(model.config)
    with patch_mla(model):
        generate(model, ids, mask, mla)
    tokens, es = cache.get_seq_length(), 4
    formula = LAYERS * 2 * tokens * (R // num_shards + P) * es
    rope_bytes = LAYERS * 2 * tokens * P * es
    mla_latent_bytes = sum(layer.latent.numel() * layer.latent.element_size() for layer in mla.layers)
    for shard in range(num_shards):
        assert cache.shard_nbytes(shard) == formula == cache.expected_shard_nbytes()
        assert (cache.shard_nbytes(shard) - rope_bytes) * num_shards == mla_latent_bytes
    assert cache.nbytes() == num_shards * formula
    assert all(tuple(layer.keys.shape) == (2, num_shards, tokens, R // num_shards) for layer in cache.layers)


# -- distributed ---------------------------------------------------------------------------------------
def test_distributed_two_processes_equal_simulated(tmp_path):
    """Two gloo processes, each holding only its shard's weights and cache, generate exactly what the
    simulated N = 2 run generates (logits within float tolerance); each rank's cache holds one shard."""
    import torch.multiprocessing as mp

    import tpla_worker

    ids, mask = prompt_batch()
    spec = dict(seed=0, overrides={}, rotation="pca", prompt=ids, mask=mask, new_tokens=6)
    mp.spawn(tpla_worker.run_rank, args=(2, str(tmp_path / "init"), str(tmp_path), spec), nprocs=2, join=True)
    model = tpla_model()
    tokens, logits, cache = tpla_run(model, ids, mask, 2, "pca", new_tokens=6)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(result["sequences"], tokens)
        assert (result["logits"] - logits).abs().max() < 1e-4
        assert result["held"] == 1 and result["latent_width"] == R // 2
        assert result["nbytes"] == result["shard_nbytes"] == result["expected"] == cache.shard_nbytes(rank)


def test_distributed_world_size_must_match(tmp_path):
    import torch.distributed as dist

    model = tpla_model()
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        patch_tpla(model, num_shards=2, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"world size 1 != num_shards=2"):
            patch_tpla(model, num_shards=2, distributed=True)
        with pytest.raises(ValueError, match=r"world size 1 != num_shards=2"):
            make_cache("tpla", model, num_shards=2, distributed=True)
    finally:
        dist.destroy_process_group()
    assert "forward" not in model.model.layers[0].self_attn.__dict__


# -- registry, patching, errors --------------------------------------------------------------------------
def test_patch_model_tpla_matches_patch_tpla_and_restores():
    model = tpla_model()
    ids, mask = prompt_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    tokens, logits, _ = tpla_run(model, ids, mask, 2, "hadamard")
    handle = patch_model(model, "tpla", num_shards=2, rotation="hadamard")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    assert isinstance(handle.last_cache, TPLACache) and handle.last_cache.num_shards == 2
    assert torch.equal(out.sequences, tokens) and torch.equal(torch.stack(out.logits), logits)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_unpatched_model_with_tpla_cache_is_stock_mla():
    """On an unpatched model a simulated TPLACache stores the stock latent in the per-shard layout and hands
    it back whole: exactly the stock model's results (no per-shard softmax without patch_tpla)."""
    from transformers import DynamicCache

    model = tpla_model()
    ids, mask = prompt_batch()
    ref_tokens, ref_logits = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = TPLACache(model.config, num_shards=4, rotation=None)
    tokens, logits = generate(model, ids, mask, cache)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    assert cache.shard_nbytes(3) == cache.expected_shard_nbytes()
    with patch_tpla(model, num_shards=4, rotation=None), pytest.raises(ValueError, match="filled by a stock forward"):
        generate(model, ids, mask, cache)
    with pytest.raises(ValueError, match="patched with kvcompress.tpla.patch_tpla"):
        generate(model, ids, mask, TPLACache(model.config, num_shards=2, rotation=None, shard=1))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_shards=3), ValueError, r"num_shards=3 does not divide kv_lora_rank=32; allowed: \[1, 2, 4, 8, 16, 32\]"),
    (dict(num_shards=64), ValueError, "larger than the latent"),
    (dict(num_shards=0), ValueError, r"num_shards=0 is out of range; allowed: int >= 1"),
    (dict(num_shards=True), TypeError, "num_shards=True has type bool"),
    (dict(num_shards=2.0), TypeError, "num_shards=2.0 has type float"),
    (dict(rotation="dct"), ValueError, r"rotation='dct' is out of range; allowed: one of 'hadamard', 'pca' or None"),
    (dict(max_absorbed_tokens=0), ValueError, "max_absorbed_tokens"),
])
def test_bad_parameters_refused_before_any_change(kwargs, error, match):
    model = tpla_model()
    with pytest.raises(error, match=match):
        patch_tpla(model, **kwargs)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    if "max_absorbed_tokens" not in kwargs:
        with pytest.raises(error, match=match):
            TPLACache(model.config, **kwargs)


def test_hadamard_needs_power_of_two_latent():
    model = tiny_model("deepseek_v3", kv_lora_rank=24)
    with pytest.raises(ValueError, match="power of two.*got 24; use rotation='pca' or None"):
        patch_tpla(model, num_shards=2, rotation="hadamard")
    with patch_tpla(model, num_shards=2, rotation="pca"):
        pass


def test_unsupported_model_and_mismatches():
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match="unsupported model type 'llama'"):
        patch_tpla(llama)
    with pytest.raises(ValueError, match="does not support model_type='llama'"):
        make_cache("tpla", llama)
    with pytest.raises(ValueError, match="rotation"):
        make_cache("tpla", tpla_model(), rotation="random")
    model = tpla_model()
    ids, mask = prompt_batch()
    with patch_tpla(model, num_shards=2, rotation="hadamard"):
        for cache, match in ((TPLACache(model.config, num_shards=4, rotation="hadamard"), "cache/patch mismatch"),
                             (TPLACache(model.config, num_shards=2, rotation="pca"), "cache/patch mismatch")):
            with pytest.raises((ValueError, TypeError), match=match):
                generate(model, ids, mask, cache)
            assert cache.get_seq_length() == 0
        with pytest.raises(ValueError, match="already patched"):
            patch_tpla(model)
