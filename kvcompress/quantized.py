"""transformers' own ``QuantizedCache`` as a peer method (``quantized``), with its bytes counted.

The method
----------
``transformers.QuantizedCache`` (KIVI-style, Liu et al. 2024) keeps, per layer, every cached token in
a low-bit integer form and the most recent tokens (at most ``residual_length``) in full precision.
Each group of ``q_group_size`` elements is stored as ``nbits``-bit integers ``q`` with one scale ``s``
and one zero point / shift ``z``, and read back as ``x ~ s * (q - z)`` (quanto) or ``(q - z) * s``
(HQQ, whose zero is in integer units). When the residual part reaches ``residual_length`` tokens, the
whole layer (dequantised history + residual + new tokens) is quantised again and the residual emptied.
The prefill's own attention sees the exact states (the layer returns them unquantised); from the first
decoded token on, attention reads the dequantised history. This module changes none of that: it builds
the stock class with the backend's options and adds ``nbytes()``.

Backends (``backend``): ``quanto`` (package ``optimum-quanto``, ``nbits`` 2 or 4; its integer unpacking
is a C++/CUDA extension that torch compiles on first use, with ninja and a C++ compiler, or nvcc on a
GPU) and ``hqq`` (package ``hqq``, ``nbits`` 1, 2, 3, 4 or 8, plain PyTorch). Both run on CPU and GPU.
The grouping axis stays at transformers' default (0) for keys and values.

Bytes
-----
``CountedQuantizedCache.nbytes()`` counts what the layer objects hold after the last update, nothing
derived: per layer, the tensors inside ``_quantized_keys`` and ``_quantized_values`` (quanto: the packed
``uint8`` data, ``_scale`` and ``_shift`` of its ``WeightQBitsTensor``; HQQ: the packed ``uint8`` tensor
and the ``scale`` and ``zero`` tensors of its metadata dict) plus the full-precision residual
``keys``/``values``. For ``T`` tokens of ``E = B * H * T * D`` elements per layer and tensor that is
about ``E * nbits / 8 + (E / q_group_size) * 2 * scale_bytes + residual`` bytes, with packing padding
(quanto packs rows of ``8 / nbits`` groups, HQQ's 3-bit packs 10 values in 32 bits). Tensor subclasses
are counted through ``__tensor_flatten__`` (their inner tensors), never by their logical shape.

Which transformers versions
---------------------------
5.17 takes ``QuantizedCache(backend, config, nbits, axis_key, axis_value, q_group_size,
residual_length)`` with defaults in the signature; 5.24 takes the same names with ``None`` meaning the
layer's default (and adds an ``fp8`` backend, not offered here as 5.17 lacks it). The cache is built with
every option passed by name, which both accept. Their residual flush rules agree for one-token decode
steps and differ for multi-token updates after the prefill (5.17 looks at the residual's length before
the update alone, 5.24 adds the new tokens); ``nbytes()`` counts whatever is held, so it is right on both.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.cache_utils import QuantizedCache

from .models import text_config
from .registry import MethodParams, Range, param, register_method

BACKENDS: dict[str, dict[str, Any]] = {
    # backend -> the package it needs (import name, pip name) and the bit widths transformers allows for it
    "quanto": dict(module="optimum.quanto", package="optimum-quanto", nbits=(2, 4)),
    "hqq": dict(module="hqq", package="hqq", nbits=(1, 2, 3, 4, 8)),
}


@dataclass(frozen=True)
class QuantizedParams(MethodParams):
    """The parameters of the registered method ``quantized`` (transformers' ``QuantizedCache``)."""

    method: ClassVar[str] = "quantized"

    backend: str = param("quanto", "quantisation backend: quanto (optimum-quanto) or hqq",
                         Range(str, choices=tuple(BACKENDS)))
    nbits: int = param(4, "bits per cached element (quanto: 2 or 4; hqq: 1, 2, 3, 4 or 8)",
                       Range(int, choices=(1, 2, 3, 4, 8)), note="allowed values depend on backend")
    q_group_size: int = param(64, "elements sharing one scale and zero point", Range(int, low=1),
                              note="must divide the model's head dim")
    residual_length: int = param(128, "most recent tokens kept in full precision before re-quantising",
                                 Range(int, low=1))

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = BACKENDS[self.backend]["nbits"]
        if self.nbits not in allowed:
            raise ValueError(f"quantized: parameter nbits={self.nbits} is not supported by backend="
                             f"{self.backend!r}; allowed: one of {', '.join(map(str, allowed))}")


def backend_available(backend: str) -> bool:
    """True when the package that ``backend`` needs is importable (checked without importing it)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    module = BACKENDS[backend]["module"]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("optimum")
        return False


def held_nbytes(obj: object) -> int:
    """Bytes of the tensors inside ``obj``: a tensor, a tensor subclass (through ``__tensor_flatten__``),
    or a tuple, list or dict of them; anything else (shapes, dtypes, ints) counts 0."""
    if isinstance(obj, torch.Tensor):
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            return obj.numel() * obj.element_size()
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is None:
            raise TypeError(f"cannot count the bytes of tensor subclass {type(obj).__name__} (no __tensor_flatten__)")
        names, _ = flatten()
        return sum(held_nbytes(getattr(obj, name)) for name in names)
    if isinstance(obj, (tuple, list)):
        return sum(held_nbytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(held_nbytes(item) for item in obj.values())
    return 0


def quantized_layer_nbytes(layer) -> int:
    """Bytes one ``QuantizedLayer`` holds: its quantised keys and values (data, scales, zeros) and its
    full-precision residual keys and values."""
    held = ("_quantized_keys", "_quantized_values", "keys", "values")  # 5.17 sets the first two on first update
    return sum(held_nbytes(getattr(layer, name, None)) for name in held)


class CountedQuantizedCache(QuantizedCache):
    """``transformers.QuantizedCache``, unchanged, plus :meth:`nbytes` (see the module docstring).

    Args:
        config: the model's config (a multimodal config's text config is used).
        backend, nbits, q_group_size, residual_length: as :class:`QuantizedParams`; validated by it.
    """

    def __init__(self, config, backend: str = QuantizedParams.backend, nbits: int = QuantizedParams.nbits,
                 q_group_size: int = QuantizedParams.q_group_size,
                 residual_length: int = QuantizedParams.residual_length):
        QuantizedParams(backend=backend, nbits=nbits, q_group_size=q_group_size, residual_length=residual_length)
        if not backend_available(backend):
            spec = BACKENDS[backend]
            raise ImportError(f"quantized: backend={backend!r} needs the package {spec['package']!r}, which is not "
                              f"installed (pip install {spec['package']}, or pip install 'kvcompress[bench]')")
        cfg = text_config(config)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head_dim % q_group_size:
            raise ValueError(f"quantized: parameter q_group_size={q_group_size} must divide the model's head dim "
                             f"({head_dim}); allowed: a divisor of {head_dim}")
        super().__init__(backend=backend, config=cfg, nbits=nbits, axis_key=0, axis_value=0,
                         q_group_size=q_group_size, residual_length=residual_length)
        self.backend = backend

    def nbytes(self) -> int:
        """Bytes held now: every layer's quantised data, scales and zeros, and its full-precision residual."""
        return sum(quantized_layer_nbytes(layer) for layer in self.layers)


def _build_quantized(model_or_config, **params) -> CountedQuantizedCache:
    return CountedQuantizedCache(text_config(model_or_config), **params)


register_method(
    "quantized",
    summary="stock transformers QuantizedCache (KIVI-style low-bit groups + full-precision residual): a peer",
    build=_build_quantized,
    params=QuantizedParams,
    families=("llama", "qwen2", "mistral"),
    cache_class="kvcompress.quantized.CountedQuantizedCache",
    doc="docs/quantized.md",
)
