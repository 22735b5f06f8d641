"""Adapters that evaluate other KV-cache tools on the same RULER samples (run in their own environments)."""
