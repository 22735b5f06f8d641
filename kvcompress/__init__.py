"""kvcompress: KV-cache compression caches for Hugging Face ``transformers`` generation.

Methods, one home each: :class:`XKVCache` (cross-layer SVD, ``kvcompress.xkv``), :class:`MLALatentCache`
and :func:`patch_mla` (DeepSeek latent-only caching, ``kvcompress.mla``), :class:`TPLACache` and
:func:`patch_tpla` (tensor-parallel latent attention, ``kvcompress.tpla``), :func:`convert_gqa_to_mla`
(TransMLA, ``kvcompress.transmla``); and a peer to compare against, :class:`CountedQuantizedCache`
(transformers' own ``QuantizedCache`` with its bytes counted, ``kvcompress.quantized``). Importing this
package registers every method (``kvcompress.registry``); :func:`patch_model` switches one on for an
existing model.
"""

from .registry import MethodParams, get_method, list_methods, make_cache, register_method
from .hooks import PatchHandle
from .patch import patch_model
from .xkv import XKVCache, XKVParams, default_group_size, patch_xkv
from .mla import MLALatentCache, MLAParams, absorbed_attention, patch_mla
from .tpla import TPLACache, TPLAParams, patch_tpla
from .quantized import CountedQuantizedCache, QuantizedParams
from .xkv_latent import XKVLatentCache, XKVLatentParams, patch_xkv_mla
from .transmla import convert_gqa_to_mla, distill_from_teacher, kv_elements_per_token, save_converted

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "get_method", "list_methods", "make_cache", "register_method", "MethodParams", "PatchHandle", "patch_model",
    "XKVCache", "XKVParams", "default_group_size", "patch_xkv",
    "MLALatentCache", "MLAParams", "absorbed_attention", "patch_mla",
    "TPLACache", "TPLAParams", "patch_tpla",
    "CountedQuantizedCache", "QuantizedParams",
    "XKVLatentCache", "XKVLatentParams", "patch_xkv_mla",
    "convert_gqa_to_mla", "distill_from_teacher", "kv_elements_per_token", "save_converted",
]
