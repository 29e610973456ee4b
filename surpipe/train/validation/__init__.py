"""Held-out validation, in one home:

- :mod:`~surpipe.train.validation.split`: which rows a run never trains on, and the record of it
  that a run folder keeps and a resume compares;
- :mod:`~surpipe.train.validation.metrics`: the numbers measured on those rows with fixed noise;
- :mod:`~surpipe.train.validation.during`: what a training run evaluates on the side (held-out
  numbers, ``--keep-best``, the picture grids);
- :mod:`~surpipe.train.validation.report`: the same numbers for a finished adapter
  (``surpipe eval --store``).
"""
