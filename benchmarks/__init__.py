"""Benchmarks of kvcompress (RULER accuracy, speed and memory); importable from a source checkout."""
