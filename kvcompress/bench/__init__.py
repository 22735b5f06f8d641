"""Speed and memory benchmarks of the methods against the stock caches (``kvcompress bench``).

Modules: ``spec`` (the ``name:param=value`` method specs of every command line), ``speed`` (the
measurements, table and plot), ``plotting`` (headless matplotlib), ``hardware`` (device sync, copy
bandwidth, kernel inputs shared by the scripts in benchmarks/). This file imports nothing.
"""
