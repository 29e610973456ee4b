"""Stage two, training the SUR-adapter from the feature store. Read in this order:

- ``recipe``: :class:`TrainRecipe`, the program (check -> setup -> train -> save);
- ``config``: the options; ``inputs`` (with ``groups``): what a run reads, checked at once;
- ``setup``: accelerate, the frozen UNet, adapter, projection and optimizer; ``data``: the
  resumable, checked block stream; ``losses``: the three loss terms; ``numerics``: non-finite guards;
- ``run_folder`` (names in ``run_layout``): the run folder, its checkpoints (``checkpoint``) and
  the resume check (``identity``); ``log``: metrics.jsonl, train.log, trackers, the loss curve;
- ``validation``: the held-out split, its metrics, what a run evaluates on the side, ``eval --store``.
"""
