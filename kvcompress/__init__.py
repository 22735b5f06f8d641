"""kvcompress: KV-cache compression caches for Hugging Face ``transformers`` generation.

Methods (one module each): :class:`XKVCache` (cross-layer SVD, ``kvcompress.xkv``).
"""

from .xkv import XKVCache, default_group_size

__version__ = "0.1.0"

__all__ = ["XKVCache", "default_group_size", "__version__"]
