"""Offline RULER: generate the tasks, run methods on them (resumable), write the table and plot.

Example (a small CPU run):

    kvcompress ruler --length 1024 --tasks niah_single_1,vt --samples 4 \\
        --methods dynamic,xkv:rank_k=0.25:rank_v=0.375 --out results/ruler

Outputs under --out: dataset.jsonl (the samples), results/<method>.jsonl (one record per sample,
appended as it finishes; rerun the same command after an interrupt to resume), summary.md and
accuracy_vs_ratio.png. The code is kvcompress.ruler; benchmarks/ruler/ has the peers (other tools on the
same samples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_args import check_device, check_smollm2, int_at_least, method_specs

MIN_LENGTH = 256  # kvcompress.ruler.generate.MIN_LENGTH (kept import-free: a test checks they agree)
SMOLLM2_MODEL_TYPE = "llama"  # config.model_type of the evaluated model

HELP = "RULER accuracy of methods against the stock cache (offline tasks, resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", choices=["smollm2"], help="model to evaluate (default smollm2)")
    parser.add_argument("--length", type=int_at_least(MIN_LENGTH), nargs="+", default=[4096],
                        help=f"target lengths in tokens of the model's tokenizer, each >= {MIN_LENGTH} (default 4096)")
    parser.add_argument("--tasks", default="all", help="comma list of tasks, 'niah', 'qa' or 'all' (default)")
    parser.add_argument("--samples", type=int_at_least(1), default=20, help="samples per task and length (default 20)")
    parser.add_argument("--seed", type=int, default=42, help="generator seed (default 42)")
    parser.add_argument("--methods", type=method_specs, default="dynamic",
                        help="comma list of name[:param=value...], e.g. dynamic,xkv:rank_k=0.25:rank_v=0.375 "
                        "('kvcompress methods' lists them)")
    parser.add_argument("--dataset", default=None,
                        help="evaluate this JSONL dataset instead of generating one (filtered by --tasks)")
    parser.add_argument("--out", default="results/ruler", help="output directory (default results/ruler)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=1,
                        help="samples of one task per generate call (default 1)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                        help="cap on generated tokens (default: RULER's per-task budget)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-chat-template", action="store_true", help="feed the raw text (base models)")
    parser.add_argument("--generate-only", action="store_true", help="write dataset.jsonl and stop")
    parser.add_argument("--report-only", action="store_true", help="rewrite summary.md and the plot from results")
    parser.add_argument("--title", default=None, help="title of the table and plot")


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every check that needs no model (exit 2 naming the option); ``args.device`` becomes the device used
    and ``args.task_list`` the tasks."""
    from .ruler import generate

    if args.report_only and args.generate_only:
        parser.error("--report-only and --generate-only exclude each other")
    if args.report_only:
        found = sorted(Path(args.out, "results").glob("*.jsonl"))
        if not found:
            parser.error(f"--report-only: no results in {Path(args.out, 'results')} (no *.jsonl file); run the "
                         "methods first or give the --out of an earlier run")
        return
    try:
        args.task_list = generate.parse_tasks(args.tasks)
    except ValueError as error:
        parser.error(f"--tasks: {str(error).removeprefix('tasks: ')}")
    if args.dataset is not None:
        if args.generate_only:
            parser.error("--generate-only writes a new dataset: it cannot be combined with --dataset")
        if not Path(args.dataset).is_file():
            parser.error(f"--dataset: no such file {args.dataset!r}")
        try:
            rows = generate.read_jsonl(args.dataset)
            tasks_in_file = sorted({row["task"] for row in rows})
        except (ValueError, KeyError, TypeError) as error:
            parser.error(f"--dataset {args.dataset}: not a RULER JSONL dataset written by 'kvcompress ruler' "
                         f"({type(error).__name__}: {error})")
        if not set(tasks_in_file) & set(args.task_list):
            parser.error(f"--dataset {args.dataset} holds no sample of the tasks asked for (--tasks {args.tasks}); "
                         f"its tasks: {', '.join(tasks_in_file) or 'none'}")
    from types import SimpleNamespace

    from .registry import get_method

    for method in args.methods:  # the model is SmolLM2 (a llama): a method for other families fails now
        try:
            get_method(method.name).check_family(SimpleNamespace(model_type=SMOLLM2_MODEL_TYPE))
        except ValueError as error:
            parser.error(f"--methods {method.label}: {error}")
    check_smollm2(parser)
    args.device = check_device(parser, args.device)


def run(args: argparse.Namespace) -> int:
    import torch

    from .bench.spec import parse_method_specs
    from .ruler import generate, report, results, runner

    out = Path(args.out)

    def title(records) -> str:  # the lengths the results hold (a --dataset need not be --length's)
        lengths = sorted({r["length"] for r in records if "length" in r}) or args.length
        return args.title or f"RULER, {args.model}, length {'/'.join(map(str, lengths))}"

    if args.report_only:
        records = results.read_all(out / "results")
        md, png = report.write_report(records, out, title(records))
        print(md.read_text())
        print(f"wrote {md}" + (f" and {png}" if png else ""))
        return 0

    methods = parse_method_specs(args.methods) if isinstance(args.methods, str) else args.methods
    tasks = getattr(args, "task_list", None) or generate.parse_tasks(args.tasks)
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    from kvcompress.models import load_smollm2

    print(f"loading {args.model} on {device} ({args.dtype}) ...", flush=True)
    model, tokenizer = load_smollm2(dtype=getattr(torch, args.dtype), device=device)

    if args.dataset:
        samples = [s for s in generate.read_jsonl(args.dataset) if s["task"] in tasks]
        print(f"{len(samples)} samples from {args.dataset}")
    else:
        samples = generate.generate_dataset(generate.hf_token_counter(tokenizer), tasks, args.length,
                                            args.samples, args.seed)
        path = generate.write_jsonl(samples, out / "dataset.jsonl")
        print(f"wrote {len(samples)} samples to {path}")
    if args.generate_only:
        return 0
    try:
        runner.run_ruler(model, tokenizer, samples, methods, out / "results", batch_size=args.batch_size,
                         chat_template=False if args.no_chat_template else None,
                         max_new_tokens=args.max_new_tokens)
    except KeyboardInterrupt:
        print(f"interrupted: finished samples are kept in {out / 'results'}; rerun the same command to resume",
              file=sys.stderr)
        raise
    records = results.read_all(out / "results")
    md, png = report.write_report(records, out, title(records))
    print(md.read_text())
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0
