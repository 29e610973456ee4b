"""``surpipe train``: stage two, the SUR-adapter trained from the feature store.

Tiny CPU run on the bundled sample (after extract-llm and encode-latents):

    surpipe train --store runs/demo/store.zarr --model runs/demo/models/sd --llm-layer 3 \
        --out runs/demo/train --max-steps 50 --batch-size 4 --grad-accum 1

Loads only the frozen UNet and the scheduler config: the LLM features, both CLIP embeddings and
the VAE latent distributions come from the store. Rerunning the same command resumes from the
latest checkpoint in ``--out``; a run folder made with other settings is refused.
"""

from __future__ import annotations

import contextlib

from surpipe.errors import SurpipeError
from surpipe.store.blockjob import dist_env
from surpipe.store.locks import exclusive_lock
from surpipe.store.location import apply_store_options
from surpipe.train.config import TrainConfig  # noqa: F401  (the stage's config: CLI, surpipe run)
from surpipe.train.recipe import TrainRecipe


def run(cfg: TrainConfig) -> dict:
    """Check the setup, load the frozen UNet, train (or resume) and save the adapter.

    The run folder is locked while training: a second job on the same ``--out`` is refused.
    """
    apply_store_options(cfg)  # --storage-options (a store at a URL): checked before any work
    recipe = TrainRecipe(cfg)
    inputs = recipe.check()  # every problem at once, before anything is written
    try:
        recipe.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SurpipeError(f"cannot create run folder {recipe.out}: {e.strerror or e}; choose another --out") from None
    main = dist_env().rank == 0  # data-parallel: rank 0 holds the run folder for the job
    lock = exclusive_lock(recipe.run.lock, f"run folder {recipe.out}") if main else contextlib.nullcontext()
    with lock:
        recipe.lock_held = main
        recipe.setup(inputs)
        return recipe.train()
