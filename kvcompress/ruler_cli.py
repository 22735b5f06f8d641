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

HELP = "RULER accuracy of methods against the stock cache (offline tasks, resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", choices=["smollm2"], help="model to evaluate (default smollm2)")
    parser.add_argument("--length", type=int, nargs="+", default=[4096],
                        help="target lengths in tokens of the model's tokenizer (default 4096)")
    parser.add_argument("--tasks", default="all", help="comma list of tasks, 'niah', 'qa' or 'all' (default)")
    parser.add_argument("--samples", type=int, default=20, help="samples per task and length (default 20)")
    parser.add_argument("--seed", type=int, default=42, help="generator seed (default 42)")
    parser.add_argument("--methods", default="dynamic",
                        help="comma list of name[:param=value...], e.g. dynamic,xkv:rank_k=0.25:rank_v=0.375")
    parser.add_argument("--dataset", default=None,
                        help="evaluate this JSONL dataset instead of generating one (filtered by --tasks)")
    parser.add_argument("--out", default="results/ruler", help="output directory (default results/ruler)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples of one task per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap on generated tokens (default: RULER's per-task budget)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-chat-template", action="store_true", help="feed the raw text (base models)")
    parser.add_argument("--generate-only", action="store_true", help="write dataset.jsonl and stop")
    parser.add_argument("--report-only", action="store_true", help="rewrite summary.md and the plot from results")
    parser.add_argument("--title", default=None, help="title of the table and plot")


def run(args: argparse.Namespace) -> int:
    import torch

    from .bench.spec import parse_method_specs
    from .ruler import generate, report, results, runner

    out = Path(args.out)
    title = args.title or f"RULER, {args.model}, length {'/'.join(map(str, args.length))}"
    if args.report_only:
        md, png = report.write_report(results.read_all(out / "results"), out, title)
        print(md.read_text())
        print(f"wrote {md}" + (f" and {png}" if png else ""))
        return 0

    methods = parse_method_specs(args.methods)  # validate before the slow model load
    tasks = generate.parse_tasks(args.tasks)
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
    md, png = report.write_report(results.read_all(out / "results"), out, title)
    print(md.read_text())
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0
