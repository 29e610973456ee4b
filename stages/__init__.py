"""Orchestration: one module per ``surpipe`` command, each with a typed config and ``run(config)``."""
