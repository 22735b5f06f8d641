"""The documentation against the code: the demo's quoted bytes and ratio against the memory formulas, the
method tables against the registry, and every relative link against the files of the repository."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import torch

import kvcompress
from kvcompress import XKVCache

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

# SmolLM2-135M-Instruct, the demo's model (kvcompress.models; 30 layers, 9 query / 3 KV heads of dim 64)
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192)
DEMO_MAX_NEW_TOKENS = 32  # kvcompress demo's --max-new-tokens default
FP32 = 4


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- the demo's figures --------------------------------------------------------------------------------

def _demo_blocks() -> list[tuple[str, str]]:
    """(file, block) for every fenced block that follows a ``<!-- demo-output -->`` marker."""
    found = []
    for path in DOC_FILES:
        for match in re.finditer(r"<!-- demo-output -->\s*```[^\n]*\n(.*?)```", _text(path), re.S):
            found.append((_rel(path), match.group(1)))
    return found


def _smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(**SMOLLM2)


def _xkv_bytes(prompt_tokens: int, decoded_tokens: int) -> tuple[int, int]:
    """``XKVCache.nbytes()`` and ``reserved_nbytes()`` for the demo: default parameters, a ``prompt_tokens`` prefill, then
    ``decoded_tokens`` more exact tokens, fp32. The bytes depend on the shapes only, so random states do,
    and on the ranks, not on the factorisation route, so the test takes the faster float32 one.

    The decoded tokens are fed as one update per layer: fewer than ``min_compress_tokens`` of them are
    due for compression, so they stay exact as they do one token at a time (checked below), and the test
    avoids rebuilding the compressed keys and values at every step. The tail's capacity is the same either
    way: after the compression it holds the window (room for 16 more), and fewer than
    ``min_compress_tokens`` decoded tokens make it grow at most once, to the same 1.25x."""
    config = _smollm2_config()
    cache = XKVCache(config, svd_method="gram32")
    assert decoded_tokens < cache.params["min_compress_tokens"]
    gen = torch.Generator().manual_seed(0)
    for tokens in (prompt_tokens, decoded_tokens):
        shape = (1, config.num_key_value_heads, tokens, config.head_dim)
        for layer in range(config.num_hidden_layers if tokens else 0):
            cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), layer)
        compressed = [[s.length for s in group.segments] for group in cache.groups]
        expected = prompt_tokens - cache.params["sink"] - cache.params["window"]
        assert compressed == [[expected]] * len(cache.groups), compressed
    assert cache.get_seq_length() == prompt_tokens + decoded_tokens
    assert cache.nbytes() == cache.expected_nbytes()
    assert cache.params["window"] + decoded_tokens <= 1.25 * _tail_room(cache.params["window"])
    return cache.nbytes(), cache.reserved_nbytes()


def _tail_room(tokens: int) -> int:
    from kvcompress.storage import grown_capacity

    return grown_capacity(tokens, 0)


def _dynamic_bytes(tokens: int) -> int:
    """``DynamicCache`` bytes: keys and values of every layer, fp32."""
    return 2 * SMOLLM2["num_hidden_layers"] * SMOLLM2["num_key_value_heads"] * SMOLLM2["head_dim"] * tokens * FP32


def test_demo_output_is_quoted_somewhere():
    assert _demo_blocks(), "no <!-- demo-output --> block in README.md or docs/"


@pytest.mark.parametrize("where,block", _demo_blocks())
def test_demo_bytes_and_ratio_match_the_formulas(where, block):
    prompt = int(re.search(r"prompt: (\d+) tokens", block).group(1))
    stock_mib = float(re.search(r"DynamicCache:\s+([\d.]+) MiB", block).group(1))
    xkv_mib = float(re.search(r"XKVCache:\s+([\d.]+) MiB", block).group(1))
    ratio = float(re.search(r"memory saving: ([\d.]+)x", block).group(1))
    stock_allocated = float(re.search(r"DynamicCache:\s+[\d.]+ MiB held,\s+([\d.]+) MiB allocated", block).group(1))
    xkv_allocated = float(re.search(r"XKVCache:\s+[\d.]+ MiB held,\s+([\d.]+) MiB allocated", block).group(1))
    allocated_ratio = float(re.search(r"smaller held .*?, ([\d.]+)x smaller allocated", block).group(1))
    ranks = re.search(r"group_size=(\d+), rank_k=(\d+), rank_v=(\d+)", block)
    config = _smollm2_config()
    defaults = XKVCache(config)
    assert (defaults.group_size, defaults.rank_k, defaults.rank_v) == tuple(int(x) for x in ranks.groups()), where

    # The cache holds the prompt and every generated token but the last; the stock bytes fix how many.
    per_token = _dynamic_bytes(1)
    tokens = round(stock_mib * 2**20 / per_token)
    decoded = tokens - prompt
    assert 0 <= decoded < DEMO_MAX_NEW_TOKENS, f"{where}: {stock_mib} MiB is not a demo's token count"
    assert f"{_dynamic_bytes(tokens) / 2**20:.2f}" == f"{stock_mib:.2f}", where

    xkv, xkv_reserved = _xkv_bytes(prompt, decoded)
    assert f"{xkv / 2**20:.2f}" == f"{xkv_mib:.2f}", f"{where}: XKVCache holds {xkv / 2**20:.2f} MiB"
    assert f"{_dynamic_bytes(tokens) / xkv:.2f}" == f"{ratio:.2f}", where
    # allocated: the stock cache's tensors are exactly what it holds; xKV's tail has room to grow
    assert f"{stock_allocated:.2f}" == f"{stock_mib:.2f}", where
    assert f"{xkv_reserved / 2**20:.2f}" == f"{xkv_allocated:.2f}", f"{where}: XKVCache allocates {xkv_reserved / 2**20:.2f} MiB"
    assert f"{_dynamic_bytes(tokens) / xkv_reserved:.2f}" == f"{allocated_ratio:.2f}", where


def _demo_ratios() -> tuple[float, float]:
    """The demo's savings: by the bytes held and by the bytes allocated."""
    where, block = _demo_blocks()[0]
    match = re.search(r"memory saving: ([\d.]+)x smaller held .*?, ([\d.]+)x smaller allocated", block)
    return float(match.group(1)), float(match.group(2))


def test_every_ratio_quoted_for_the_demo_is_the_demo_output():
    """A line that names the demo and a ratio ("4.46x") quotes the demo's own output (held or allocated)."""
    expected = {f"{r:.2f}" for r in _demo_ratios()}
    quoted = []
    for path in DOC_FILES:
        for line in _text(path).splitlines():
            if "demo" in line.lower() and "memory saving" not in line:
                quoted += [(_rel(path), line, r) for r in re.findall(r"(\d+\.\d+)x", line)]
    assert quoted, "no line quotes the demo's ratio"
    wrong = [(where, line) for where, line, r in quoted if f"{float(r):.2f}" not in expected]
    assert not wrong, f"expected one of {sorted(expected)}x: {wrong}"


# -- the method tables ---------------------------------------------------------------------------------

def _tables_after(marker: str) -> list[tuple[str, list[list[str]]]]:
    tables = []
    for path in DOC_FILES:
        lines = _text(path).splitlines()
        for i, line in enumerate(lines):
            if line.strip() != marker:
                continue
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip().strip("|").split("|")]
                if not all(set(c) <= set("-: ") for c in cells):
                    rows.append(cells)
            tables.append((_rel(path), rows))
    return tables


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_method_tables_list_exactly_the_registered_methods_and_parameters():
    tables = _tables_after("<!-- method-table -->")
    assert tables, "no <!-- method-table --> in the docs"
    for where, rows in tables:
        header, body = rows[0], rows[1:]
        assert header[0] == "name" and "parameters" in header, where
        column = header.index("parameters")
        listed = [_names(row[0])[0] for row in body]
        assert listed == kvcompress.list_methods(), where
        for row in body:
            params = [p.name for p in kvcompress.get_method(_names(row[0])[0]).params]
            assert _names(row[column]) == params or (not params and row[column] == "none"), (where, row[0])


def test_each_method_page_documents_every_parameter():
    for name in kvcompress.list_methods():
        method = kvcompress.get_method(name)
        if not method.doc:
            continue
        text = _text(ROOT / method.doc)
        section = re.search(r"^## Parameters\n(.*?)(?=^## )", text, re.S | re.M)
        assert section, f"{method.doc} has no '## Parameters' section"
        missing = [p.name for p in method.params if f"`{p.name}`" not in section.group(1)]
        assert not missing, f"{method.doc}: parameters {missing} of {name!r} are not in its Parameters section"


def test_readme_names_every_registered_method():
    text = _text(ROOT / "README.md")
    missing = [n for n in kvcompress.list_methods() if n != "dynamic" and f"`{n}`" not in text]
    assert not missing, missing


def test_quoted_unknown_method_message_is_the_real_one():
    with pytest.raises(ValueError) as raised:
        kvcompress.make_cache("xvk", _smollm2_config())
    real = re.search(r"known methods: (.*)$", str(raised.value)).group(1)
    quoted = [(_rel(p), m) for p in DOC_FILES for m in re.findall(r"known methods: ([a-z_, ]+)", _text(p))]
    assert quoted
    assert all(m.strip() == real for _, m in quoted), (real, quoted)


# -- links ---------------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFKC", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _links():
    for path in DOC_FILES:
        text = re.sub(r"```.*?```", "", _text(path), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if not re.match(r"[a-z]+:", target):
                yield path, target


def test_every_relative_link_points_into_the_repository_at_an_existing_file():
    broken = []
    for path, target in _links():
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if ROOT not in (resolved, *resolved.parents):
            broken.append((_rel(path), target, "outside the repository"))
        elif not resolved.exists():
            broken.append((_rel(path), target, "missing"))
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append((_rel(path), target, "no such heading"))
    assert not broken, broken


def test_docs_name_no_path_outside_the_repository():
    outside = [(_rel(p), m) for p in DOC_FILES
               for m in re.findall(r"(?:/tmp/|/work/|/home/|shared/notes|\.gpu/)\S*", _text(p))]
    assert not outside, outside


def test_repository_files_named_in_the_docs_exist():
    """`benchmarks/x.py`, `tests/x.py`, `kvcompress/...`, `docs/...` named in the text and in the commands
    exist (Python examples may name files of the reader's own, so they are left out)."""
    missing = []
    for path in DOC_FILES:
        text = re.sub(r"```python\n.*?```", "", _text(path), flags=re.S)
        for name in re.findall(r"(?<![\w./])((?:benchmarks|tests|kvcompress|docs)/[\w./-]*\w)", text):
            if not (ROOT / name).exists() and not (path.parent / name).exists():
                missing.append((_rel(path), name))
    assert not missing, missing
