"""Speed and memory of methods against the stock cache, measured in the same run.

Example (CPU): kvcompress bench --model smollm2 --context 1024 --new-tokens 16 \\
    --methods dynamic,xkv:rank_k=0.25:rank_v=0.375 --out results/bench

Example (GPU, against stock eager and stock compiled): kvcompress bench --model llama-3.1-8b \\
    --batch 8 --context 32768 --methods dynamic,xkv --baselines static,static-compiled --budget-gib 78

--baselines adds stock transformers references besides dynamic (DynamicCache, eager): static
(StaticCache, eager) and static-compiled (StaticCache with generate()'s automatic torch.compile of the
decode step, mode reduce-overhead = CUDA graphs; skipped on CPU unless --compile-backend is given).

--compile-methods adds a row <method>-compiled for every method but dynamic: its cache (and attention
patch) with the decode step compiled exactly as static-compiled's. Methods declaring max_cache_len get
context + new tokens unless their spec sets it; a cache that is not compileable gives a skipped row
with the reason. Example (GPU, MLA: eager and compiled latent cache against stock compiled):
    kvcompress bench --model deepseek-v3-attn --layers 4 --context 32768 --methods dynamic,mla \\
    --baselines static-compiled --compile-methods

Writes <stem>.json, <stem>.md and <stem>.png (stem default bench_<model>_<device>) under --out (default
results/bench). The code is kvcompress.bench.speed (its docstring says what each figure means).
"""

from __future__ import annotations

import argparse
import sys

from .cli_args import check_device, check_smollm2, int_at_least, method_specs, positive_float

BASELINE_NAMES = ("dynamic", "static", "static-compiled")  # kvcompress.bench.speed.BASELINES (kept import-free)

HELP = "prefill/decode time, cache bytes and peak memory of methods, as ratios to the stock cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        choices=["smollm2", "llama-3.1-8b", "deepseek-v2-lite", "deepseek-v3-attn"],
                        help="the real SmolLM2, or a random-weight shape (default smollm2)")
    parser.add_argument("--layers", type=int_at_least(1), default=None,
                        help="cut a random-weight shape to this many layers (not for smollm2)")
    parser.add_argument("--batch", type=int_at_least(1), default=1, help="batch size (default 1)")
    parser.add_argument("--context", type=int_at_least(2), default=4096, help="prompt tokens per row (default 4096)")
    parser.add_argument("--new-tokens", type=int_at_least(2), default=32, help="decode steps timed (default 32)")
    parser.add_argument("--methods", type=method_specs, default="dynamic,xkv",
                        help="comma list of name[:param=value...] ('kvcompress methods' lists them); dynamic is "
                        "always measured too")
    parser.add_argument("--baselines", type=_baselines, default="dynamic",
                        help="comma list of stock references: " + ", ".join(BASELINE_NAMES)
                        + " (default dynamic, always measured; static-compiled compiles for minutes on a big model)")
    parser.add_argument("--compile-methods", action="store_true",
                        help="also measure each method (but dynamic) compiled like static-compiled, as a row "
                        "<method>-compiled; methods declaring max_cache_len get context + new tokens unless set; "
                        "a cache that is not compileable gives a skipped row")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled rows (static-compiled, --compile-methods) "
                        "(default inductor with reduce-overhead on GPU; on CPU they are skipped unless given, e.g. "
                        "eager, which only checks the plumbing)")
    parser.add_argument("--prefill-chunk", type=int_at_least(1), default=None,
                        help="chunked prefill of this many tokens for every row (generate's prefill_chunk_size)")
    parser.add_argument("--repeats", type=int_at_least(1), default=2, help="runs per method, best kept (default 2)")
    parser.add_argument("--budget-gib", type=positive_float, default=None,
                        help="memory budget for the largest batch/context estimate (default: the GPU's memory)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--out", default="results/bench", help="output directory (default results/bench)")
    parser.add_argument("--stem", default=None, help="output file name stem (default bench_<model>_<device>)")


def _baselines(text: str) -> str:
    """argparse type of --baselines: refuse unknown names at parse time, before a model is loaded."""
    unknown = [b for b in (t.strip().lower() for t in text.split(",")) if b and b not in BASELINE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {', '.join(map(repr, unknown))}; allowed: "
                                         f"{', '.join(BASELINE_NAMES)}")
    return text


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every check that needs no model (exit 2 naming the option); ``args.device`` becomes the device used."""
    if args.model == "smollm2":
        if args.layers is not None:
            parser.error("--layers cuts the random-weight shapes only (llama-3.1-8b, deepseek-v2-lite, "
                         "deepseek-v3-attn), not smollm2")
        check_smollm2(parser)
    args.device = check_device(parser, args.device)
    if args.compile_backend is not None:
        import torch

        if args.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
            # the usual ones: torch's default list leaves out those tagged debug, eager among them
            usual = sorted(set(torch.compiler.list_backends()) | {"eager", "aot_eager"})
            parser.error(f"--compile-backend: unknown backend {args.compile_backend!r}; allowed: {', '.join(usual)} "
                         "(or any name in torch.compiler.list_backends(exclude_tags=()))")


def run(args: argparse.Namespace) -> int:
    import torch

    from .bench import speed
    from .bench.spec import parse_method_specs

    methods = parse_method_specs(args.methods) if isinstance(args.methods, str) else args.methods
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    budget = args.budget_gib
    if budget is None and device.startswith("cuda"):
        budget = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
    print(f"loading {args.model} on {device} ({dtype}) ...", flush=True)
    model = speed.load_model(args.model, device, dtype, args.layers)
    stem = args.stem or f"bench_{args.model}_{device.split(':')[0]}"
    try:
        out = speed.bench(model, methods, batch=args.batch, context=args.context, new_tokens=args.new_tokens,
                          repeats=args.repeats, budget_gib=budget, baselines=args.baselines,
                          compile_backend=args.compile_backend, prefill_chunk=args.prefill_chunk,
                          compile_methods=args.compile_methods, random_weights=args.model != "smollm2",
                          on_result=lambda partial: speed.write_outputs(partial, args.out, stem))
    except KeyboardInterrupt:
        print(f"interrupted: the methods measured so far are in {args.out}/{stem}.json", file=sys.stderr)
        raise
    paths = speed.write_outputs(out, args.out, stem)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
