"""Summary of RULER results: a markdown table (accuracy per task, average, cache bytes, ratio to
``dynamic``) and a PNG plot of average accuracy against compression (one line per method through its
settings), for our methods and peers alike.

The ratio of a method is its mean cache bytes over the samples it shares with the reference method
(``dynamic``, or kvpress's ``no_press`` for peers' runs without it) divided by the reference's mean
bytes over the same samples; accuracy is RULER's (mean score x 100) per task, and the average is the
mean over the tasks every method of the table has. When methods finished different samples (a run
cut short), a second table and plot restrict every method to the samples all of them finished.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..bench.plotting import pyplot, save_figure
from .generate import TASKS

REFERENCES = ("dynamic", "kvpress:no_press")


def common_ids(records: list[dict]) -> set[str]:
    """The sample ids that every method in ``records`` finished."""
    per_method: dict[str, set[str]] = defaultdict(set)
    for r in records:
        per_method[r["method"]].add(r["id"])
    return set.intersection(*per_method.values()) if per_method else set()


def summarize(records: list[dict], ids: set[str] | None = None) -> list[dict]:
    """One row per method: ``method, tool, n, tasks{task: acc}, average, cache_bytes, ratio``.

    ``ids`` restricts every method to those samples. ``average`` is the mean accuracy over the tasks
    that *every* row has (``shared_tasks``), so rows of runs cut short stay comparable.
    """
    by_method: dict[str, list[dict]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for r in records:  # the first record of a (method, sample) counts: two runs of one method may both append
        if (ids is None or r["id"] in ids) and (r["method"], r["id"]) not in seen:
            seen.add((r["method"], r["id"]))
            by_method[r["method"]].append(r)
    ref_label = next((m for m in REFERENCES if m in by_method), None)
    ref_bytes = {r["id"]: r["cache_bytes"] for r in by_method.get(ref_label, [])}
    rows = []
    for method, recs in by_method.items():
        per_task: dict[str, list[float]] = defaultdict(list)
        for r in recs:
            per_task[r["task"]].append(r["score"])
        tasks = {t: 100.0 * sum(v) / len(v) for t, v in per_task.items()}
        shared = [r for r in recs if r["id"] in ref_bytes]
        ratio = None
        if shared and ref_label is not None:
            ours = sum(r["cache_bytes"] for r in shared) / len(shared)
            theirs = sum(ref_bytes[r["id"]] for r in shared) / len(shared)
            ratio = ours / theirs if theirs else None
        rows.append(dict(method=method, tool=recs[0].get("tool", "?"), n=len(recs), tasks=tasks,
                         cache_bytes=sum(r["cache_bytes"] for r in recs) / len(recs), ratio=ratio))
    shared = [t for t in TASKS if all(t in row["tasks"] for row in rows)]
    for row in rows:
        row["shared_tasks"] = shared
        row["average"] = sum(row["tasks"][t] for t in shared) / len(shared) if shared else float("nan")
    # the reference first, then by falling cache ratio (least compressed first)
    rows.sort(key=lambda row: (row["method"] != ref_label, -(row["ratio"] if row["ratio"] is not None else 2.0)))
    return rows


def _short(task: str) -> str:
    return (task.replace("niah_", "").replace("single_", "s").replace("multikey_", "mk").replace("multivalue", "mv")
            .replace("multiquery", "mq"))


def markdown_table(rows: list[dict]) -> str:
    """The summary as a markdown table (task columns in RULER's order, abbreviated: s1 = niah_single_1 ...)."""
    tasks = [t for t in TASKS if any(t in row["tasks"] for row in rows)]
    head = ["method", "tool", "n"] + [_short(t) for t in tasks] + ["avg", "cache MiB/sample", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['method']}`", row["tool"], str(row["n"])]
        cells += [f"{row['tasks'][t]:.1f}" if t in row["tasks"] else "-" for t in tasks]
        cells += [f"**{row['average']:.1f}**", f"{row['cache_bytes'] / 2**20:.2f}",
                  f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    legend = ", ".join(f"{_short(t)} = {t}" for t in tasks if _short(t) != t)
    shared = rows[0]["shared_tasks"] if rows else []
    note = "" if shared == tasks else f"avg: mean over the tasks every row has ({', '.join(_short(t) for t in shared)}). "
    return "\n".join(lines) + "\n\n" + note + legend + "\n"


def _label(method: str) -> str:
    """A short plot label: ``xkv:rank_k=0.25:rank_v=0.375`` -> ``xkv k.25 v.375``, ``kvpress:snapkv:0.6`` -> ``snapkv .6``."""
    text = method.replace("kvpress:", "").replace("rank_k=", "k").replace("rank_v=", "v").replace(":", " ")
    return text.replace("0.", ".")


DECODE_PATH_PARAMS = ("select_budget",)  # parameters that change what decode reads, not the cache


def method_family(method: str) -> str:
    """The line a method's point belongs to in the plot: one line per method, its settings as points.

    ``xkv:ratio=7`` -> ``xkv``; ``quantized:backend=hqq:nbits=2`` -> ``quantized hqq`` (the backend,
    default quanto, is part of the method); ``kvpress:adakv_snapkv:0.85`` -> ``kvpress adakv_snapkv``.
    A decode-path parameter (``select_budget``: which tokens a step attends, not how the cache is stored)
    starts a line of its own: ``xkv:ratio=7:select_budget=0.1`` -> ``xkv select_budget=0.1``.
    """
    parts = method.split(":")
    if parts[0] == "kvpress":
        return "kvpress " + (parts[1] if len(parts) > 1 else "")
    if parts[0] == "quantized":
        backend = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("backend=")), "quanto")
        return f"quantized {backend}"
    path = [p for p in parts[1:] if p.split("=", 1)[0] in DECODE_PATH_PARAMS]
    return " ".join([parts[0], *path])


def _ratio_ticks(ax) -> None:
    """Ticks a reader can use on the log axis (1x, 1.5x, 2x, 3x, ..., 8x, 10x, 12x, 16x, ...) over the data."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    low, high = ax.get_xlim()
    ticks = [0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64, 96, 128]
    ax.xaxis.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))


def plot(rows: list[dict], path: str | Path, title: str = "RULER",
         ylabel: str = "RULER accuracy (%), mean over shared tasks") -> Path | None:
    """Average accuracy against compression (reference bytes / method bytes), one line per method
    (:func:`method_family`) through its settings, the reference as a dashed level (needs matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    families: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["ratio"]:
            families[method_family(row["method"])].append(row)
    reference = next((row for row in rows if row["method"] in REFERENCES), None)
    if reference is not None:
        ax.axhline(reference["average"], color="grey", linestyle="--", linewidth=1,
                   label=f"{reference['method']} (1x)")
    markers = "osD^v<>pPX*h"
    for i, (family, members) in enumerate(sorted(families.items())):
        if reference is not None and members == [reference]:
            continue
        members.sort(key=lambda row: 1.0 / row["ratio"])
        xs = [1.0 / row["ratio"] for row in members]
        ys = [row["average"] for row in members]
        dashed = members[0]["tool"] != "kvcompress"
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle=":" if dashed else "-", label=family)
        for x, y, row in zip(xs, ys, members):
            ax.annotate(_label(row["method"]), (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    _ratio_ticks(ax)
    ax.set_xlabel("times smaller than the reference cache (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    return save_figure(fig, path)


def write_report(records: list[dict], out_dir: str | Path, title: str = "RULER") -> tuple[Path, Path | None]:
    """Write ``summary.md`` and ``accuracy_vs_ratio.png`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    text = f"# {title}\n\nEvery sample each method finished:\n\n" + markdown_table(rows)
    png = plot(rows, out_dir / "accuracy_vs_ratio.png", title)
    ids = common_ids(records)
    if any(row["n"] != len(ids) for row in rows) and ids:
        same = summarize(records, ids)
        text += f"\nThe same {len(ids)} samples for every method:\n\n" + markdown_table(same)
        plot(same, out_dir / "accuracy_vs_ratio_same_samples.png", f"{title} (same {len(ids)} samples)")
    md = out_dir / "summary.md"
    md.write_text(text)
    return md, png
