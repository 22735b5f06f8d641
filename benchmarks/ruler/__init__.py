"""RULER evaluation scripts: ``run`` (kvcompress methods, the same as ``kvcompress ruler``) and ``peers/``
(other tools on the same samples). The generator, scoring, runner and report live in ``kvcompress.ruler``."""
