"""Argument types and checks shared by the ``kvcompress`` verbs.

Everything here runs while the command line is parsed, before any model is loaded: a bad value ends the
command at once with exit status 2 and a message naming the option and the allowed values.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"  # argparse names the type in its own messages
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def method_specs(text: str):
    """An argparse type: a comma list of ``name[:param=value...]``, each checked against the registry
    (:func:`kvcompress.bench.spec.parse_method_specs`); returns the list of ``MethodSpec``."""
    from .bench.spec import parse_method_specs

    try:
        return parse_method_specs(text)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"{error} (see 'kvcompress methods')") from None


def check_device(parser: argparse.ArgumentParser, text: str, option: str = "--device") -> str:
    """``auto`` (cuda if available, else cpu), ``cpu``, ``cuda`` or ``cuda:N`` -> the device to use; an
    unknown name or a CUDA device this machine does not have is a usage error (exit 2)."""
    import torch

    allowed = "auto, cpu, cuda or cuda:N"
    text = text.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        parser.error(f"{option}: unknown device {text!r}; allowed: {allowed}")
    if not torch.cuda.is_available():
        parser.error(f"{option} {text}: CUDA is not available on this machine (torch {torch.__version__}, "
                     f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        parser.error(f"{option} {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                     f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text


def check_smollm2(parser: argparse.ArgumentParser, option: str = "--model") -> None:
    """The SmolLM2 GGUF file and the ``gguf`` reader must be installed (no download is ever made)."""
    from .models import find_smollm2_gguf, smollm2_available

    if not smollm2_available():
        try:
            find_smollm2_gguf()
            why = "the package 'gguf' that reads it is not installed (pip install 'kvcompress[demo]')"
        except FileNotFoundError as error:
            why = str(error)
        parser.error(f"{option} smollm2: {why}")
