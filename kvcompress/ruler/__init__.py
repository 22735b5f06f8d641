"""Offline RULER (Hsieh et al., 2024): task generator, runner, scoring and report (``kvcompress ruler``).

Modules: ``words`` (built-in vocabulary and the essay substitute), ``generate`` (the tasks, JSONL
dataset, the prompt), ``needles`` (the needle sweep's prompts, in the same format), ``scoring``
(RULER's string_match_all / string_match_part), ``results`` (per-sample JSONL results, resumable),
``runner`` (kvcompress methods on a model), ``report`` (markdown table and PNG plot). ``words``,
``generate``, ``needles``, ``scoring`` and ``results`` import the standard library only, so the peers'
adapters in benchmarks/ruler/peers/ can use them in an environment with another transformers version.
This file imports nothing.
"""
