"""kvcompress: KV-cache compression caches for Hugging Face ``transformers`` generation.

Methods (one module each): :class:`XKVCache` (cross-layer SVD, ``kvcompress.xkv``).
"""

from .xkv import XKVCache, default_group_size, patch_xkv
from .registry import get_method, list_methods, make_cache, register_method
from .patch import PatchHandle, patch_model

__version__ = "0.1.0"

__all__ = ["XKVCache", "default_group_size", "patch_xkv", "__version__"]
__all__ += ["get_method", "list_methods", "make_cache", "register_method", "PatchHandle", "patch_model"]
from .mla import MLALatentCache, absorbed_attention, patch_mla
__all__ += ["MLALatentCache", "absorbed_attention", "patch_mla"]
from .tpla import TPLACache, patch_tpla
__all__ += ["TPLACache", "patch_tpla"]
from .transmla import convert_gqa_to_mla, distill_from_teacher, kv_elements_per_token
__all__ += ["convert_gqa_to_mla", "distill_from_teacher", "kv_elements_per_token"]
