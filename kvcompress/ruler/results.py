"""Per-sample RULER results as JSONL, one file per method, appended as samples finish (stdlib only).

A record is written (and flushed to disk) as soon as its sample is scored, so an interrupted run
loses at most the samples in flight; ``ResultsFile.done_ids()`` lets the next run skip the rest. A
line cut short by a kill is ignored on reading and its sample is simply redone.

Record fields: ``id, task, length, index, method, tool, prediction, answers, metric, score,
cache_bytes, prompt_tokens, new_tokens, seconds, prefill_seconds, batch_size`` (``prefill_seconds`` in
records written since it was added; the kvpress adapter also writes ``cache_bytes_allocated``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


def method_slug(label: str) -> str:
    """A file-name-safe form of a method label (``xkv:rank_k=0.25`` -> ``xkv_rank_k-0.25``)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label.replace("=", "-")).strip("_") or "method"


def cache_nbytes(cache) -> int:
    # Same count as kvcompress.ops.cache_nbytes, kept here without importing torch or transformers so that
    # the kvpress peer adapter, which runs in its own environment with an older transformers, can use it.
    """Bytes of the tensors a cache holds: ``cache.nbytes()`` when it has one (kvcompress caches),
    else the sum of every layer's ``keys``/``values`` (stock ``DynamicCache`` and peers' caches)."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


class ResultsFile:
    """The results of one method: ``<dir>/<slug>.jsonl``."""

    def __init__(self, directory: str | Path, method: str):
        self.method = method
        self.path = Path(directory) / f"{method_slug(method)}.jsonl"

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with self.path.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interrupt: redo that sample
                    continue
                if rec.get("method") == self.method:
                    out.append(rec)
        return out

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.records()}

    def append(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:  # end a line cut short by a kill, so it cannot swallow the next record
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        with self.path.open("a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_all(directory: str | Path) -> list[dict]:
    """Every complete record of every method in a results directory."""
    out = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        with path.open() as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out
