"""Calibration data and statistics: offline deterministic token ids, and the second moment of every
layer's attention input.

All the bases of the conversion are functions of one matrix per layer, ``M = sum_t h~_t h~_t^T / n`` with
``h~ = [input_layernorm(x); 1]`` the augmented attention input: a projection ``[W | b]`` then has the output
second moment ``[W | b] M [W | b]^T``, biases included.
"""

from __future__ import annotations

import functools

import torch
from tqdm.auto import tqdm

from ..models import text_config
from .checks import check_bool
from .source import _Source


SPLITS = ("calibration", "heldout", "stdlib")
# Standard-library folders left out of the "stdlib" text: tests (much generated noise), the GUI
# and demo packages, vendored packages, and pydoc_data (the "calibration"/"heldout" text itself).
_STDLIB_SKIP = ("test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "pydoc_data", "site-packages",
                "dist-packages", "ensurepip", "venv")
_STDLIB_MIN_CHARS = 200  # shorter docstrings are mostly one-line summaries of the next line of code


@functools.lru_cache(maxsize=1)  # ~1 MB, a few seconds to parse: built once per process
def _stdlib_docstrings() -> str:
    """The module, class and function docstrings (at least ``_STDLIB_MIN_CHARS`` long) of the Python
    standard library installed with the running interpreter, in file-path order, blank-line separated."""
    import ast
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts[:-1]) & set(_STDLIB_SKIP) or path.stem == "__phello__":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a file for another Python version: skipped
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _STDLIB_MIN_CHARS:
                    docs.append(doc)
    return "\n\n".join(docs)


def calibration_text(split: str = "calibration") -> str:
    """English text shipped with Python itself, so no download is ever needed.

    ``split="calibration"`` joins the even-numbered topics of ``pydoc_data.topics`` (Python's language
    reference, ~460k characters in all, sorted by name), ``"heldout"`` the odd-numbered ones, so conversion
    and evaluation never see the same text. ``"stdlib"``: the docstrings of the installed standard library
    (module, class and function docstrings of at least 200 characters, tests and ``pydoc_data`` left out;
    about 1.1M characters, ~280k SmolLM2 tokens, on Python 3.11), a larger text for recovery training,
    disjoint from the other two. Deterministic for a given Python installation.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "stdlib":
        return _stdlib_docstrings()
    from pydoc_data.topics import topics  # ~460k characters: loaded only when asked for

    names = sorted(topics)[0 if split == "calibration" else 1 :: 2]
    return "\n\n".join(topics[name].strip() for name in names)


def calibration_tokens(
    model,
    tokenizer=None,
    num_sequences: int | None = 8,
    seq_len: int = 512,
    split: str = "calibration",
    seed: int = 0,
    progress: bool = True,
) -> torch.LongTensor:
    """Deterministic calibration token ids ``[num_sequences, seq_len]`` without any download.

    With a tokenizer: consecutive windows of :func:`calibration_text` (``split``); ``num_sequences=None``
    takes every whole window the text holds. Without one (e.g. a tiny random model): text sampled from the
    model itself, from its BOS token, with ``torch`` seeded by ``seed`` and the split (the global RNG state
    is restored afterwards).
    """
    if tokenizer is None and not isinstance(model, torch.nn.Module):  # the model samples the text
        raise TypeError(f"model must be a transformers causal LM (torch.nn.Module), got {type(model).__name__}")
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer must be None or a callable tokenizer, got {type(tokenizer).__name__}")
    if num_sequences is None and tokenizer is None:
        raise ValueError("num_sequences=None (every window of the text) needs a tokenizer; "
                         "give a positive int to sample text from the model")
    for name, value in (("num_sequences", 1 if num_sequences is None else num_sequences), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    check_bool("progress", progress)
    if tokenizer is not None:
        ids = tokenizer(calibration_text(split), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if num_sequences is None:
            num_sequences = ids.numel() // seq_len
            if num_sequences == 0:
                raise ValueError(f"seq_len must be at most {ids.numel()} tokens of {split} text, got {seq_len}")
        if ids.numel() < num_sequences * seq_len:
            raise ValueError(
                f"num_sequences * seq_len must be at most {ids.numel()} tokens of {split} text, "
                f"got {num_sequences} * {seq_len}"
            )
        return ids[: num_sequences * seq_len].view(num_sequences, seq_len).clone()
    config = text_config(model)
    bos = config.bos_token_id if config.bos_token_id is not None else 0
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + (1 << 20) * SPLITS.index(split))
        start = torch.full((num_sequences, 1), bos, dtype=torch.long, device=device)
        with tqdm(total=seq_len - 1, desc="sampling calibration text", disable=not progress) as bar:

            def tick(input_ids, scores):  # a logits processor that only advances the progress bar
                bar.update(1)
                return scores

            out = model.generate(start, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                 max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                 attention_mask=torch.ones_like(start), pad_token_id=bos,
                                 logits_processor=[tick])
    return out[:, :seq_len].cpu()


def _as_token_batch(value, name: str = "calibration", vocab_size: int | None = None) -> torch.LongTensor:
    """``value`` (the argument ``name``: a 1-D or 2-D integer tensor, or a list of 1-D ones) as ``[rows, tokens]``
    int64, checked against ``[0, vocab_size)`` when given."""
    if isinstance(value, torch.Tensor):
        tokens = value
    elif isinstance(value, (list, tuple)) and value and all(isinstance(t, torch.Tensor) for t in value):
        if len({t.numel() for t in value}) != 1:
            raise ValueError(f"{name}: the 1-D token tensors of the list must have equal lengths, "
                             f"got {sorted({t.numel() for t in value})}")
        tokens = torch.stack([t.reshape(-1) for t in value])
    else:
        allowed = "None (built-in offline text), " if name == "calibration" else ""
        raise TypeError(
            f"{name} must be {allowed}a LongTensor of token ids [sequences, tokens] "
            f"or a list of equal-length 1-D LongTensors; got {type(value).__name__}"
        )
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.numel() == 0 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a non-empty 1-D or 2-D integer tensor of token ids, got shape "
                         f"{tuple(tokens.shape)} and dtype {tokens.dtype}")
    if vocab_size is not None:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} token ids must be in [0, vocab_size={vocab_size}), got ids in [{low}, {high}]")
    return tokens.long()


@torch.no_grad()
def _input_moments(model, src: _Source, tokens: torch.LongTensor, progress: bool) -> list[torch.Tensor]:
    """Per layer, ``sum_t h~_t h~_t^T / n`` of the attention input ``h~ = [input_layernorm(x); 1]`` (float64)."""
    device = next(model.parameters()).device
    moments = [torch.zeros(src.hidden + 1, src.hidden + 1, dtype=torch.float64, device=device) for _ in src.layers]
    count = 0
    for row in tqdm(tokens, desc="calibration forward", disable=not progress):
        hidden_states = model(input_ids=row[None].to(device), output_hidden_states=True, use_cache=False).hidden_states
        for layer, moment, x in zip(src.layers, moments, hidden_states):
            h = layer.input_layernorm(x)[0].double()
            h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
            moment += h.T @ h
        count += row.numel()
    return [(m / count).cpu() for m in moments]
