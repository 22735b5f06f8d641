"""Offline RULER (Hsieh et al., 2024): task generator, runner, scoring and report.

Modules: ``words`` (built-in vocabulary and the essay substitute), ``generate`` (the tasks, JSONL
dataset), ``scoring`` (RULER's string_match_all / string_match_part), ``results`` (per-sample JSONL
results, resumable; stdlib only so peers' adapters can use it), ``runner`` (our methods on a model),
``report`` (markdown table and PNG plot), ``peers/`` (other tools evaluated on the same samples).
"""
