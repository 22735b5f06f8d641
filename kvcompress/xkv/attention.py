"""Fused decode over :class:`~kvcompress.xkv.cache.XKVCache` factors (:func:`patch_xkv`): the attention
function registered with transformers, the grouped prefill, and the patch itself."""

from __future__ import annotations

import sys
import warnings

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..hooks import (PatchHandle, register_attention, set_attention_implementation, set_attribute, undo_on_failure,
                     wrap_forward)
from ..kernels.xkv_decode import valid_mask_from_attention_mask, xkv_decode_attention
from ..models import text_config
from ..ops import grouped_query_sdpa
from .cache import XKVCache, XKVLayer

# -- fused decode: patch_xkv -------------------------------------------------------------------------
XKV_ATTENTION_PREFIX = "kvcompress_xkv_"  # + the implementation it falls back to, e.g. "kvcompress_xkv_sdpa"
_SLOT_ATTR = "_kvcompress_xkv_slot"  # an attention module's _ForwardSlot (set by the patch)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


class _ForwardSlot:
    """Where the attention function finds the :class:`~kvcompress.xkv.cache.ForwardContext` of the forward
    running on its module (``None`` outside a forward over an ``XKVLayer``)."""

    def __init__(self):
        self.context = None
_FALLBACK_ATTR = "_kvcompress_xkv_fallback"  # the attention function used when not decoding fused


def _fallback_attention(module: torch.nn.Module, implementation: str):
    """The attention function ``implementation`` resolves to for ``module`` (eager: its modeling file's)."""
    if implementation == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"{type(module).__name__}'s module has no eager_attention_forward to fall back to")
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _grouped_prefill_applies(module: torch.nn.Module, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether a multi-token call can take :func:`_grouped_prefill_attention` instead of the model's SDPA:
    a GQA module whose previous implementation was ``sdpa``, a 4-D mask or none (then a plain causal square),
    and none of the extras SDPA treats specially (softcap, position bias, attention sinks)."""
    if getattr(module, "num_key_value_groups", 1) <= 1:
        return False
    if getattr(module, _FALLBACK_ATTR) is not ALL_ATTENTION_FUNCTIONS["sdpa"]:
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux", "sinks")):
        return False
    if kwargs.get("output_attentions"):
        return False
    return attention_mask is None or attention_mask.dim() == 4


def _grouped_prefill_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float, scaling: float | None,
                               kwargs: dict) -> tuple[torch.Tensor, None]:
    """A prefill (or chunk) over an :class:`XKVLayer`: transformers' SDPA attention without its ``repeat_kv``
    copy (:func:`kvcompress.ops.grouped_query_sdpa`); the mask and causal rules are SDPA's own."""
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :kv_length]
    elif is_causal and kv_length != q_length:
        # SDPA's causal mask is top-left aligned: only a square is the usual causal prefill
        return getattr(module, _FALLBACK_ATTR)(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                               **kwargs)
    return grouped_query_sdpa(query, key, value, attention_mask, dropout_p=dropout, is_causal=is_causal,
                              scale=scaling), None


def xkv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """Attention function registered by :func:`patch_xkv` (transformers' ``AttentionInterface`` contract).

    On a decode step of an :class:`XKVLayer` with compressed segments, ``key``/``value`` are only the exact
    tail that the layer's ``update`` returned (and recorded in the forward's context, ``context.tail``): attention then runs over
    the layer's sinks, factored segments and tail with
    :func:`kvcompress.kernels.xkv_decode.xkv_decode_attention`, without rebuilding keys or values. A
    multi-token call over an :class:`XKVLayer` (the prefill, each chunk of a chunked prefill, a next turn)
    of an SDPA model with grouped-query attention takes transformers' SDPA path without its ``repeat_kv``
    copy (:func:`kvcompress.ops.grouped_query_sdpa`: same mask, same kernels). Every other call (layers
    without segments, other caches, eager models) goes to the model's previous attention implementation
    unchanged.
    """
    # plain attribute reads (the patch sets both on every attention module): torch.compile traces them,
    # where older dynamo versions cannot trace module.__dict__ methods
    slot = getattr(module, _SLOT_ATTR, None)
    context = None if slot is None else slot.context
    if context is None or context.tail is None:
        if context is not None and query.shape[2] > 1 and _grouped_prefill_applies(module, attention_mask, kwargs):
            return _grouped_prefill_attention(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        return getattr(module, _FALLBACK_ATTR)(module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    layer, tail = context.layer, context.tail
    context.tail = None  # consumed: one attention call per update
    if kwargs.get("softcap") is not None or dropout:
        raise ValueError("patch_xkv's fused decode supports neither attention softcapping nor dropout; "
                         "remove the patch (handle.remove()) for this model")
    parts = layer.decode_parts(tail=tail)  # the tail views update() returned: no new views per step
    total = sum(part.length for part in parts) - layer.outlier_tokens()  # the sequence's own slots
    if attention_mask is not None and attention_mask.dim() == 2:  # flash-attention style [B, T] padding mask
        valid = attention_mask[:, -total:].bool().expand(query.shape[0], total)
    elif attention_mask is None and layer.is_static:
        # no mask (transformers skips it when nothing is padded): a static tail's free slots must still be
        # hidden -- tokens past the device length counter
        valid = (torch.arange(total, device=query.device) < layer.get_seq_length()).expand(query.shape[0], total)
    else:
        valid = valid_mask_from_attention_mask(attention_mask, query.shape[0], total)
    valid = layer.decode_valid(valid, query.shape[0], total)  # outlier tokens: their own parts
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    parts = layer.select_parts(query, parts, valid, scale)  # select_budget: the best chunks of each segment
    return xkv_decode_attention(query, parts, scale, valid), None


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Self-attention modules of a transformers decoder (they carry ``layer_idx`` and GQA grouping)."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
            and hasattr(m, "num_key_value_groups")]


def _cache_argument(args: tuple, kwargs: dict):
    """The cache an attention module's forward was given (``cache=`` on recent transformers,
    ``past_key_values=`` on older ones; always a keyword in the decoder layers' calls)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _attention_forward(module: torch.nn.Module, original, *args, **kwargs):
    """An attention module's forward under :func:`patch_xkv`: over an ``XKVLayer``, the forward runs inside
    the layer's :class:`~kvcompress.xkv.cache.ForwardContext` (closed in ``finally``, so also after
    ``KeyboardInterrupt``), then the group's compression its update left due runs, once the attention's
    rebuilt keys and values are freed."""
    cache = _cache_argument(args, kwargs)
    if not isinstance(cache, XKVCache):
        return original(*args, **kwargs)
    cache.check_model_layers(getattr(module, _MODEL_LAYERS_ATTR))
    layer = cache.layers[module.layer_idx]
    if not isinstance(layer, XKVLayer):  # a stock sliding-window layer
        return original(*args, **kwargs)
    slot = getattr(module, _SLOT_ATTR)
    context = layer.open_forward()
    slot.context = context
    try:
        output = original(*args, **kwargs)
    finally:
        slot.context = None
        layer.close_forward(context)
    if context.compression_due:
        cache.compress(layer.layer_idx)
    return output


def _model_forward(model: torch.nn.Module, original, *args, **kwargs):
    """The patched decoder's forward: a forward over an ``XKVCache`` that raises anything (also
    ``KeyboardInterrupt``) after some layer took its tokens leaves the cache refusing further use (until
    ``reset()``) instead of holding a step that no caller saw."""
    cache = _cache_argument(args, kwargs)
    if not isinstance(cache, XKVCache) or torch.compiler.is_compiling():
        return original(*args, **kwargs)
    before = cache.seq_tokens()
    try:
        return original(*args, **kwargs)
    except BaseException as error:
        if cache.seq_tokens() != before:
            cache.refuse(f"a forward stopped part-way ({type(error).__name__}) after some layers took its tokens")
        raise


_MODEL_LAYERS_ATTR = "_kvcompress_xkv_model_layers"  # the patched model's layer count, on each attention module


def patch_xkv(model: torch.nn.Module):
    """Make ``model`` decode over :class:`XKVCache` factors without rebuilding keys and values.

    Switches the model's attention implementation to ``"kvcompress_xkv_<previous>"`` (registered with
    transformers' ``AttentionInterface`` and ``AttentionMaskInterface``; masks and every non-fused call stay
    those of the previous implementation) and wraps each attention module's forward: while the module runs
    with an ``XKVCache``, a :class:`~kvcompress.xkv.cache.ForwardContext` is open on its layer, so a
    one-token update returns only the exact tail and :func:`xkv_attention_forward` attends over the factors
    (:func:`kvcompress.kernels.xkv_decode.xkv_decode_attention`: Triton on CUDA, PyTorch otherwise). The
    prefill over an ``XKVCache`` (SDPA models) attends without repeating keys and values per query head,
    which at long chunked prefills is most of the peak memory (docs/performance.md). The model's own forward
    (its decoder's) is wrapped so that a forward failing part-way leaves the cache refusing further use (until ``reset()``),
    and a cache built for another number of layers is refused before it is written. Other caches run
    exactly as before.

    Returns:
        a :class:`kvcompress.patch.PatchHandle`; ``remove()`` (or leaving ``with``) restores the previous
        implementation and the forwards.

    Raises:
        TypeError: ``model`` is not a transformers model with ``set_attn_implementation``.
        ValueError: the model type is not one of ``SUPPORTED_MODEL_TYPES``, no attention modules found, or
            the model is already patched by ``patch_xkv``.
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "set_attn_implementation", None)):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(text_config(config), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"patch_xkv does not support model_type={model_type!r}; supported model types: "
                         f"{list(SUPPORTED_MODEL_TYPES)}")
    previous = config._attn_implementation or "sdpa"
    if previous.startswith(XKV_ATTENTION_PREFIX):
        raise ValueError(f"model is already patched by patch_xkv (attention implementation {previous!r}); "
                         "remove that handle first")
    if previous not in ("sdpa", "eager"):
        # flash/flex attention take other mask formats (and transformers treats names containing theirs
        # specially): only the two dense implementations are wrapped.
        raise ValueError(f"patch_xkv supports models whose attention implementation is 'sdpa' or 'eager', got "
                         f"{previous!r}; load the model with attn_implementation='sdpa'")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"no attention modules with layer_idx found in {type(model).__name__}")
    model_layers = max(module.layer_idx for module in modules) + 1
    name = XKV_ATTENTION_PREFIX + previous
    fallbacks = [_fallback_attention(module, previous) for module in modules]  # raises before any change

    handle = PatchHandle(model, description=f"xkv fused decode on {type(model).__name__}")
    with undo_on_failure(handle):
        register_attention(name, xkv_attention_forward, previous, handle)
        for module, fallback in zip(modules, fallbacks):
            set_attribute(module, _FALLBACK_ATTR, fallback, handle)
            set_attribute(module, _SLOT_ATTR, _ForwardSlot(), handle)
            set_attribute(module, _MODEL_LAYERS_ATTR, model_layers, handle)
            wrap_forward(module, _attention_forward, handle)
        # the decoder's forward, not the model's: generate() reads the model's forward signature
        wrap_forward(getattr(model, getattr(model, "base_model_prefix", ""), model), _model_forward, handle)
        set_attention_implementation(model, name, handle)
    return handle


# -- the registered method ---------------------------------------------------------------------------


def _install_xkv(model, handle: PatchHandle, **params) -> None:
    """Fused decode (``patch_xkv``) where the model's attention allows it; elsewhere (flash/flex attention)
    the cache still works unpatched, rebuilding keys and values each step, so patching must not fail."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if implementation not in ("sdpa", "eager"):
        warnings.warn(f"xkv: attention implementation {implementation!r} has no fused decode path; the cache "
                      "rebuilds keys and values each step (load the model with attn_implementation='sdpa' for it)",
                      stacklevel=3)
        return
    handle.add_undo(patch_xkv(model).remove)

