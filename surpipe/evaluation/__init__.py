"""Using a trained SUR-adapter: rendering images with it and measuring what it changes.

Modules, in the order a newcomer meets them:

* :mod:`~surpipe.evaluation.render`: the stock diffusers pipeline (SD or SDXL) with the adapter's
  prompt embeddings, rendering with and without it, schedulers, captioned grids.
* :mod:`~surpipe.evaluation.generate`: what ``surpipe generate`` and ``surpipe eval`` share: their
  common options, opening and checking the adapter and the model before the big load, prompt files,
  both arms at the same seeds, image names, generate's output-folder rules.
* :mod:`~surpipe.evaluation.clip_score`: the CLIP score of an image against its prompt.
* :mod:`~surpipe.evaluation.suite`: ``surpipe eval``'s prompt suites, paired statistics, tables and chart.

Importing any of them loads no torch (the CLI's ``--help`` stays fast); the stages
``stages/generate.py`` and ``stages/eval.py`` orchestrate them.
"""
