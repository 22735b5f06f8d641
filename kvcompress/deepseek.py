"""One DeepSeek-V2/V3 attention forward shared by the latent methods (``kvcompress.mla``, ``kvcompress.tpla``).

The maths
---------
DeepSeek attention (multi-head latent attention) computes, for ``S`` new tokens ``x`` of a layer:

* the query ``q = W_q x`` (``q_proj``, or ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` with ``q_lora_rank``),
  per head split into ``q^N`` (``qk_nope_head_dim``, no position) and ``q^R`` (``qk_rope_head_dim``, ``p``);
* the latent ``c = kv_a_layernorm([kv_a_proj_with_mqa x]_{:r})`` (``r = kv_lora_rank`` values) and one
  RoPE key ``k^R = [kv_a_proj_with_mqa x]_{r:}`` shared by all heads;
* RoPE on ``q^R`` and ``k^R``, in one of three styles: ``"complex"`` (DeepSeek-V2, ``apply_rotary_emb`` with
  complex frequencies), ``"half"`` (V3, ``apply_rotary_pos_emb``) or ``"interleave"`` (V3 with
  ``rope_interleave``, ``apply_rotary_pos_emb_interleave``); the model's own functions are called;
* the cache stores ``(c, k^R)`` (or what a method makes of them) and hands back every cached token's;
* prefill (the stock recipe): per head ``k_h = [W_UK_h c ; k^R]``, ``v_h = W_UV_h c`` (``kv_b_proj``), the
  configured attention implementation, then ``o_proj``.

:func:`deepseek_attention_forward` does all of that once. A method supplies a :class:`LatentDecode`
object (stored on the attention module) with three parts: ``store`` (what goes into and comes back
from the cache), ``decode`` (its own attention for forwards of at most ``max_absorbed_tokens`` new
tokens, returning the heads' outputs before ``o_proj``) and ``expand`` (the per-head ``kv_b_proj``
product of the stored latent, for the stock prefill), and may refine ``takes_decode`` (which forwards
decode) and ``project`` (the new tokens' latent, default the stock ``c``). The argument binding accepts
the keyword and positional forms of transformers 5.17 (``past_key_values``) and 5.24 (``cache``).

Any cache, or none, is served: a method's own cache class, transformers' ``DynamicCache`` (which holds
the stock latent on transformers >= 5.17), or ``use_cache=False``, so plain ``model(input_ids)`` and
``model(input_ids, labels=...)`` work on a patched model like on the stock one. A cache built for
another number of layers is refused at layer 0, before anything is written; without the patch the
caches (:class:`CheckedLayersCache`) notice it as early as the states they are handed allow.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from .models import text_config

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
ROPE_STYLES = {"complex": "apply_rotary_emb", "half": "apply_rotary_pos_emb",
               "interleave": "apply_rotary_pos_emb_interleave"}


def deepseek_config(config, what: str = "MLA latent caching"):
    """The text config of a DeepSeek-V2/V3 model or config; ValueError naming ``model_type`` otherwise."""
    cfg = text_config(config)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model type {model_type!r} for {what}: the model's config has model_type="
            f"{model_type!r}; supported model_type values: {list(SUPPORTED_MODEL_TYPES)} (DeepSeek-V2/V3 "
            "multi-head latent attention; convert other models with kvcompress.transmla first)"
        )
    return cfg


def check_attn_implementation(cfg, what: str) -> str:
    """The configured attention implementation; ValueError unless it is one the patched forward supports."""
    implementation = getattr(cfg, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {implementation!r} is not supported by {what}; allowed: "
            f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)} (load the model with attn_implementation='sdpa')"
        )
    return implementation


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The DeepSeek-V2/V3 attention modules of ``model`` (those with ``kv_b_proj`` and ``kv_a_proj_with_mqa``)."""
    return [m for m in model.modules() if hasattr(m, "kv_b_proj") and hasattr(m, "kv_a_proj_with_mqa")]


def rope_style(cfg) -> str:
    """``"complex"`` (V2), ``"interleave"`` (V3 with ``rope_interleave``) or ``"half"`` (V3)."""
    if cfg.model_type == "deepseek_v2":
        return "complex"
    return "interleave" if getattr(cfg, "rope_interleave", False) else "half"


def modeling_file(module: torch.nn.Module, rope: str, what: str):
    """The modeling module of ``module`` (its RoPE helpers and ``eager_attention_forward``), checked."""
    modeling = sys.modules[type(module).__module__]
    needed = ROPE_STYLES[rope]
    if not hasattr(modeling, needed) or not hasattr(modeling, "eager_attention_forward"):
        raise ValueError(
            f"unsupported transformers version: {modeling.__name__} lacks {needed} / eager_attention_forward; "
            f"{what} supports transformers 5.17 to 5.24"
        )
    return modeling


class LatentDecode:
    """What a latent method puts on each patched attention module: its decode step and cache handling.

    Subclasses set ``max_absorbed_tokens``, ``rope`` and ``modeling`` (from :func:`rope_style` and
    :func:`modeling_file`) and implement :meth:`store`, :meth:`decode` and :meth:`expand`.
    """

    max_absorbed_tokens: int
    rope: str
    modeling: Any
    method: str = "the latent attention patch"

    def check_cache(self, module: torch.nn.Module, cache: Cache | None) -> None:
        """Raise before anything is written if ``cache`` cannot serve ``module`` (default: nothing to check)."""

    def takes_decode(self, module: torch.nn.Module, cache: Cache | None, tokens: int, compiling: bool) -> bool:
        """Whether a forward of ``tokens`` new tokens (eval mode) runs :meth:`decode` rather than the stock
        prefill; asked before anything is projected or cached. Default: ``tokens <= max_absorbed_tokens``."""
        return tokens <= self.max_absorbed_tokens

    def project(self, module: torch.nn.Module, hidden_states: torch.Tensor, cache: Cache | None,
                decode: bool) -> tuple[Any, torch.Tensor]:
        """The new tokens' latent (whatever :meth:`store` takes as ``latent``; default the stock ``c``
        ``[B, 1, S, r]`` of :func:`project_latent`) and the unrotated RoPE key ``[B, 1, S, p]``."""
        return project_latent(module, hidden_states)

    def store(self, module: torch.nn.Module, cache: Cache | None, latent: torch.Tensor, k_rot: torch.Tensor,
              compiling: bool) -> Any:
        """Write the new tokens' latent (what :meth:`project` returned; by default ``c`` ``[B, 1, S, r]``) and
        rotated RoPE key ``[B, 1, S, p]`` to ``cache`` (None: no cache) and return what :meth:`decode` /
        :meth:`expand` read."""
        raise NotImplementedError

    def decode(self, module: torch.nn.Module, q_nope: torch.Tensor, q_rot: torch.Tensor, stored: Any,
               attention_mask: torch.Tensor | None, compiling: bool) -> torch.Tensor:
        """The method's attention for a short forward: ``[B, S, H * v_head_dim]``, before ``o_proj``."""
        raise NotImplementedError

    def expand(self, module: torch.nn.Module, stored: Any, compiling: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj`` applied to every stored token's latent (``[B, T, H * (nope + v)]``) and the RoPE key
        ``[B, 1, T, p]``: the stock prefill's inputs."""
        raise NotImplementedError


@dataclass
class AttentionCall:
    """The arguments of one DeepSeek attention call, named as on every supported transformers version."""

    attention_mask: torch.Tensor | None
    position_embeddings: Any
    cache: Cache | None
    kwargs: dict


def bind_arguments(module: torch.nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> AttentionCall:
    """Name positional arguments as the stock forward does; accept ``cache`` (5.24) and ``past_key_values`` (5.17)."""
    if args:
        bound = inspect.signature(type(module).forward).bind(module, hidden_states, *args, **kwargs)
        kwargs = {k: v for k, v in bound.arguments.items() if k not in ("self", "hidden_states", "kwargs")}
        kwargs.update(bound.arguments.get("kwargs", {}))
    else:
        kwargs = dict(kwargs)
    attention_mask = kwargs.pop("attention_mask", None)
    position_embeddings = kwargs.pop("position_embeddings", None)
    cache = kwargs.pop("cache", None)
    legacy_cache = kwargs.pop("past_key_values", None)
    return AttentionCall(attention_mask, position_embeddings, cache if cache is not None else legacy_cache, kwargs)


def project_query(module: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q^N`` ``[B, H, S, nope]`` and the unrotated ``q^R`` ``[B, H, S, p]``."""
    batch, length = hidden_states.shape[:-1]
    if module.q_lora_rank is None:
        q = module.q_proj(hidden_states)
    else:
        q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden_states)))
    q = q.view(batch, length, -1, module.qk_head_dim).transpose(1, 2)
    q_nope, q_rot = torch.split(q, [module.qk_nope_head_dim, module.qk_rope_head_dim], dim=-1)
    return q_nope, q_rot


def project_latent(module: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised latent ``c`` ``[B, 1, S, r]`` and the unrotated RoPE key ``[B, 1, S, p]``."""
    batch, length = hidden_states.shape[:-1]
    compressed = module.kv_a_proj_with_mqa(hidden_states)
    latent, k_rot = torch.split(compressed, [module.kv_lora_rank, module.qk_rope_head_dim], dim=-1)
    latent = module.kv_a_layernorm(latent).view(batch, 1, length, module.kv_lora_rank)
    return latent, k_rot.view(batch, 1, length, module.qk_rope_head_dim)


def apply_rope(rope: str, modeling, q_rot: torch.Tensor, k_rot: torch.Tensor, position_embeddings):
    """The model's own RoPE (the functions of its modeling file) on the query and key RoPE parts."""
    if position_embeddings is None:
        raise ValueError("DeepSeek attention needs position_embeddings (passed by the decoder layer)")
    if rope == "complex":
        return modeling.apply_rotary_emb(q_rot, k_rot, position_embeddings.to(q_rot.device))
    cos, sin = position_embeddings
    if rope == "interleave":
        return modeling.apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    return modeling.apply_rotary_pos_emb(q_rot, k_rot, cos, sin)


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """``q_latent_h = W_UK_h^T q^N_h``: ``[B, H, S, nope] x [H, nope, r] -> [B, H, S, r]`` (one bmm)."""
    batch, heads, length, nope = q_nope.shape
    q_heads = q_nope.transpose(0, 1).reshape(heads, batch * length, nope)  # views for S = 1
    return torch.bmm(q_heads, w_uk).view(heads, batch, length, w_uk.shape[-1]).transpose(0, 1)


def absorb_output(out_latent: torch.Tensor, w_uv_t: torch.Tensor) -> torch.Tensor:
    """``o_h = W_UV_h out_latent_h``: ``[B, H, S, r] x [H, r, v] -> [B, S, H * v]`` (one bmm)."""
    batch, heads, length, rank = out_latent.shape
    out_heads = out_latent.transpose(0, 1).reshape(heads, batch * length, rank)
    out = torch.bmm(out_heads, w_uv_t).view(heads, batch, length, w_uv_t.shape[-1])
    return out.permute(1, 2, 0, 3).reshape(batch, length, heads * w_uv_t.shape[-1])


class CheckedLayersCache(Cache):
    """A ``Cache`` of one layer per model layer (``num_layers``, set by the subclass) that refuses to attend
    over misaligned layers: those of a model with another number of layers, or after a forward that
    stopped part-way (an exception, Ctrl-C, inside the model).

    What it can know: an unpatched model hands its cache nothing but each layer's states and index (no
    config, no model; ``generate`` passes none either, on transformers 5.17 and 5.24), so a model's layer
    count is only seen in the updates it makes:

    * a model with more layers than the cache: the update of the first layer the cache lacks raises
      ``ValueError`` naming both counts, before it writes. The layers before it took the forward's tokens,
      so the cache then refuses every update (``RuntimeError``) until :meth:`reset`;
    * a model with fewer layers, or a forward that stopped part-way: the cache's last layer holds fewer
      tokens than its first; the first update of the next forward (layer 0) sees that and refuses, before
      it writes. The forward that left them so is itself right (each layer attends over its own tokens).

    ``patch_mla`` / ``patch_tpla`` see the model's count and refuse another one at layer 0 of the first
    forward (:func:`check_cache_layers`). The checks read host-side lengths only (no device sync) and are
    skipped inside ``torch.compile`` (the eager prefill and any eager step make them).
    """

    num_layers: int
    _refused: str | None = None  # why the cache refuses every update until reset() (None: usable)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``Cache.update`` after the layer-count and alignment checks (see the class docstring)."""
        n = self.num_layers
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < n:
            name = type(self).__name__
            if isinstance(layer_idx, int) and not isinstance(layer_idx, bool) and layer_idx >= n:
                why = (f"this {name} was built for {n} layers but the model has at least {layer_idx + 1} layers "
                       f"(an update of layer {layer_idx} arrived)")
            else:
                why = f"layer_idx={layer_idx!r} is out of range for this {name} of {n} layers"
            if self._refused is None and any(layer.is_initialized for layer in self.layers):
                self._refused = why  # the layers before it took this forward's tokens; the model's others cannot
            raise ValueError(f"cache/model mismatch: {why}; allowed: 0..{n - 1}. Build the cache from this "
                             "model's config")
        if not torch.compiler.is_compiling():
            if layer_idx == 0:
                self._check_aligned()
            self._check_usable()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_aligned(self) -> None:
        """Refuse if layer 0 and the last layer hold different token counts at the start of a forward."""
        held = [layer.host_length() if layer.is_initialized else 0 for layer in (self.layers[0], self.layers[-1])]
        if None in held or held[0] == held[1]:
            return
        counts = [layer.host_length() if layer.is_initialized else 0 for layer in self.layers]
        if None in counts:
            return  # only the device knows some lengths (compiled steps ran): not worth a sync here
        k = next(i for i in range(1, len(counts)) if counts[i] != counts[0])
        self._refused = (
            f"its layers disagree: layers 0..{k - 1} hold {counts[0]} tokens, layer {k} holds {counts[k]}; either "
            f"a forward stopped part-way (an exception inside the model) or the model has {k} layers where this "
            f"cache was built for {self.num_layers} layers")

    def _check_usable(self) -> None:
        if self._refused is not None:
            raise RuntimeError(f"this {type(self).__name__} cannot be used: {self._refused}. Call reset() to start "
                               "a new sequence with it (or build a new cache from the model's config)")

    def reset(self) -> None:
        """Forget every token and any refusal."""
        super().reset()
        self._refused = None


def check_cache_layers(module: torch.nn.Module, cache: Cache | None, method: str) -> None:
    """Refuse a kvcompress cache built for another number of layers than the model has, at layer 0 (before
    any layer is written). Caches without a fixed layer count (``num_layers``) are not checked."""
    if cache is None or module.layer_idx != 0:
        return
    cache_layers = getattr(cache, "num_layers", None)
    model_layers = getattr(text_config(module.config), "num_hidden_layers", None)
    if isinstance(cache_layers, int) and isinstance(model_layers, int) and cache_layers != model_layers:
        raise ValueError(
            f"cache/model mismatch: this {type(cache).__name__} was built for {cache_layers} layers but the "
            f"model ({method}) has {model_layers}; build the cache from this model's config"
        )


def expanded_attention(module: torch.nn.Module, modeling, q_nope: torch.Tensor, q_rot: torch.Tensor,
                       kv: torch.Tensor, k_rope: torch.Tensor, attention_mask, kwargs: dict):
    """The stock prefill: per-head keys ``[k^N ; k^R]`` and values from ``kv`` (``kv_b_proj`` of the latent,
    ``[B, T, H * (nope + v)]``), the configured attention implementation, ``o_proj``. Bitwise the stock
    model's arithmetic when ``kv`` is ``kv_b_proj`` of the stock latent."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch, _, length, _ = q_nope.shape
    if attention_mask is not None and attention_mask.shape[-1] > kv.shape[1]:
        # keys of the valid tokens only, from a fixed-capacity cache: the positions past them are masked anyway
        attention_mask = attention_mask[..., : kv.shape[1]]
    kv = kv.view(batch, kv.shape[1], -1, module.qk_nope_head_dim + module.v_head_dim).transpose(1, 2)
    k_nope, value_states = torch.split(kv, [module.qk_nope_head_dim, module.v_head_dim], dim=-1)
    key_states = torch.cat((k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
    query_states = torch.cat((q_nope, q_rot), dim=-1)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                      modeling.eager_attention_forward)
    attn_output, attn_weights = attention(
        module, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout, scaling=module.scaling, **kwargs,
    )
    return module.o_proj(attn_output.reshape(batch, length, -1).contiguous()), attn_weights


def deepseek_attention_forward(module: torch.nn.Module, strategy: LatentDecode, hidden_states: torch.Tensor,
                               *args, **kwargs):
    """Forward of a patched DeepSeek-V2/V3 attention: ``strategy.decode`` where ``strategy.takes_decode``
    says so (default: at most ``strategy.max_absorbed_tokens`` new tokens) in eval mode, the stock prefill
    otherwise."""
    call = bind_arguments(module, hidden_states, args, kwargs)
    implementation = module.config._attn_implementation
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {implementation!r} is not supported by {strategy.method}; allowed: "
            f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)} (remove the patch to use {implementation!r})"
        )
    check_cache_layers(module, call.cache, strategy.method)
    strategy.check_cache(module, call.cache)
    # Under torch.compile Python bookkeeping whose value changes per step (call counters, weight
    # refreshes comparing data pointers) would be guarded on and recompile: the strategy skips it.
    compiling = torch.compiler.is_compiling()
    decode = not module.training and strategy.takes_decode(module, call.cache, hidden_states.shape[1], compiling)
    q_nope, q_rot = project_query(module, hidden_states)
    latent, k_rot = strategy.project(module, hidden_states, call.cache, decode)
    q_rot, k_rot = apply_rope(strategy.rope, strategy.modeling, q_rot, k_rot, call.position_embeddings)
    stored = strategy.store(module, call.cache, latent, k_rot, compiling)
    if decode:
        out = strategy.decode(module, q_nope, q_rot, stored, call.attention_mask, compiling)
        return module.o_proj(out), None
    kv, k_rope = strategy.expand(module, stored, compiling)
    return expanded_attention(module, strategy.modeling, q_nope, q_rot, kv, k_rope, call.attention_mask, call.kwargs)
