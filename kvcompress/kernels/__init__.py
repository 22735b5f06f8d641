"""Fused GPU kernels (Triton) for the compressed caches' decode attention, each with a plain-PyTorch
reference that is the CPU path and the definition the kernel is tested against.

The kernels' switches are one :class:`KernelOptions` object, read by the kernels at each call:
:func:`kernel_options` returns it, :func:`configure_kernels` changes it (and, as a context manager,
restores it). Its defaults come from the environment, read once when this module is imported:

* ``KVCOMPRESS_DISABLE_TRITON`` -- ``1`` runs the PyTorch references instead of the Triton kernels (A/B
  timing, bisecting a suspected kernel bug); ``disable_triton``;
* ``KVCOMPRESS_XKV_TMA`` -- ``auto`` (default), ``1``/``on`` or ``0``/``off``: the xKV decode kernel's
  TMA loads (:func:`kvcompress.kernels.xkv_decode._tma_usable`); ``xkv_tma``;
* ``KVCOMPRESS_XKV_AUTOTUNE`` -- ``1`` (default) or ``0``: autotune the xKV decode kernel's tiles on CUDA;
  ``xkv_autotune``;
* ``TRITON_INTERPRET`` -- Triton's own switch for its CPU interpreter (development and tests).

A value outside the allowed ones raises ``ValueError`` naming the variable and the allowed values.
``triton_usable(tensor)`` says whether a Triton kernel can run on a tensor's device: Triton is importable,
the tensor lives on a CUDA device (or the interpreter is on), and Triton is not disabled.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

TMA_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class KernelOptions:
    """The kernels' switches (see the module docstring for the environment variables giving the defaults).

    Attributes:
        disable_triton: run the PyTorch references, never a Triton kernel.
        xkv_tma: ``"auto"`` (TMA loads on sm_90+ until a launch fails, then pointer loads and one warning),
            ``"on"`` (also in Triton's interpreter; a failure is an error) or ``"off"``.
        xkv_autotune: autotune the xKV decode kernel's tiles on CUDA (else one fixed tile).
        triton_interpret: Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors.
        poison_buffers: fill the xKV kernels' output buffers with NaN before launch (tests: an element a
            kernel fails to write shows up).
        xkv_scores_config: ``None`` or a dict (``BLOCK_T``, ``BLOCK_R``, ``num_warps``, ``num_stages``) that
            runs the xKV key-rebuild kernel with that tile where it does not autotune (tests, sweeps).
    """

    disable_triton: bool = False
    xkv_tma: str = "auto"
    xkv_autotune: bool = True
    triton_interpret: bool = False
    poison_buffers: bool = False
    xkv_scores_config: Mapping | None = None

    def __post_init__(self) -> None:
        for name in ("disable_triton", "xkv_autotune", "triton_interpret", "poison_buffers"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KernelOptions.{name} must be True or False, got {getattr(self, name)!r}")
        if self.xkv_tma not in TMA_MODES:
            raise ValueError(f"KernelOptions.xkv_tma={self.xkv_tma!r}: allowed values are {list(TMA_MODES)}")
        if self.xkv_scores_config is not None and not isinstance(self.xkv_scores_config, Mapping):
            raise TypeError("KernelOptions.xkv_scores_config must be None or a dict of BLOCK_T, BLOCK_R, "
                            f"num_warps, num_stages, got {self.xkv_scores_config!r}")


def _env_flag(name: str, default: bool, environ: Mapping[str, str]) -> bool:
    value = environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{name}={value!r}: allowed values are '0' and '1' (or unset: {'1' if default else '0'})")


def options_from_environment(environ: Mapping[str, str] | None = None) -> KernelOptions:
    """The :class:`KernelOptions` the environment variables give (``environ``: default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    tma = environ.get("KVCOMPRESS_XKV_TMA", "auto").strip().lower() or "auto"
    tma = {"1": "on", "0": "off"}.get(tma, tma)
    if tma not in TMA_MODES:
        raise ValueError(f"KVCOMPRESS_XKV_TMA={environ.get('KVCOMPRESS_XKV_TMA')!r}: allowed values are 'auto' "
                         "(default), '0' and '1' (or 'off' and 'on')")
    return KernelOptions(
        disable_triton=_env_flag("KVCOMPRESS_DISABLE_TRITON", False, environ),
        xkv_tma=tma,
        xkv_autotune=_env_flag("KVCOMPRESS_XKV_AUTOTUNE", True, environ),
        triton_interpret=environ.get("TRITON_INTERPRET", "") == "1",
    )


_OPTIONS = options_from_environment()


def kernel_options() -> KernelOptions:
    """The kernels' current switches."""
    return _OPTIONS


class _Configured:
    """The previous :class:`KernelOptions`, returned by :func:`configure_kernels`; ``with`` restores it."""

    def __init__(self, previous: KernelOptions):
        self.previous = previous

    def __enter__(self) -> KernelOptions:
        return _OPTIONS

    def __exit__(self, *exc) -> None:
        global _OPTIONS
        _OPTIONS = self.previous

    def __getattr__(self, name):  # reads as the previous options
        return getattr(self.previous, name)

    def __repr__(self) -> str:
        return f"configure_kernels(previous={self.previous!r})"


def configure_kernels(**changes) -> _Configured:
    """Change the kernels' switches (fields of :class:`KernelOptions`); returns the previous options, and
    as a context manager restores them on exit::

        with configure_kernels(disable_triton=True):
            ...  # PyTorch references only

    Raises:
        TypeError: an unknown field (the error lists the allowed ones) or a value of the wrong type.
        ValueError: a value outside the allowed ones.
    """
    global _OPTIONS
    fields = [f.name for f in dataclasses.fields(KernelOptions)]
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise TypeError(f"configure_kernels got unknown option(s) {unknown}; allowed: {fields}")
    previous = _OPTIONS
    _OPTIONS = dataclasses.replace(previous, **changes)
    return _Configured(previous)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on a machine without a GPU toolchain
        return False
    return True


def triton_usable(tensor: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``tensor``'s device (CUDA + Triton, not disabled)."""
    options = _OPTIONS
    if options.disable_triton:
        return False
    if options.triton_interpret:  # Triton's CPU interpreter: development and tests
        return _triton_importable()
    return tensor.is_cuda and _triton_importable()


def next_pow2(n: int, least: int = 16) -> int:
    """The smallest power of two >= ``max(n, least)``: ``tl.arange`` and ``tl.dot`` block sizes."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached: launch planning runs every decode step);
    4 elsewhere (Triton's CPU interpreter), so that the split-over-sequence paths are still exercised."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory(index: int) -> int:
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 48 * 1024)


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on a CUDA ``device`` (the opt-in per-block limit: 227 KB
    on an H100, 163 KB on an A100); 0 elsewhere (Triton's CPU interpreter), which picks the small tiles."""
    if device.type != "cuda":
        return 0
    return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())
