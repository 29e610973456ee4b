"""The training recipe of stage two (``surpipe train``): the SUR-adapter trained from the feature
store with the frozen UNet. :class:`TrainRecipe` reads top to bottom: ``check`` (every problem at
once, before any compute) -> ``setup`` (models, optimizer, resume) -> ``train`` (the loop) ->
``save_final``. The command's entry point is :func:`stages.train.run`; tests and the bench use the
recipe directly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from surpipe.config import to_dict
from surpipe.errors import SurpipeError
from surpipe.evaluation.render import tiny_model_note
from surpipe.progress import progress_bar
from surpipe.store.blockjob import dist_env
from surpipe.train import inputs as train_inputs  # gather looked up at call time: tests count its calls
from surpipe.train import log as train_log
from surpipe.train import numerics as N
from surpipe.train.config import TrainConfig
from surpipe.train.data import rank_rows, training_stream
from surpipe.train.identity import run_identity
from surpipe.train.inputs import TrainingInputs
# torch-free at import; the names are this module's so tests can replace them
from surpipe.train.fp8 import fp8_problem as _fp8_problem
from surpipe.train.log import loss_curve as _loss_curve, tracker_problem as _tracker_problem
from surpipe.train.run_folder import RunFolder
from surpipe.train.validation import during
from surpipe.train.validation.metrics import evaluate
from surpipe.train.validation.summary import first_validation, summary


def _log_with(report_to: str):
    """The ``log_with`` argument of ``Accelerator`` for ``report_to`` (tests replace this)."""
    return None if report_to == "none" else [report_to]


class TrainRecipe:
    """One training program, read top to bottom: ``check`` (every problem at once, before any
    compute) -> ``setup`` (models, optimizer, resume) -> ``train`` (the loop) -> ``save_final``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.run = RunFolder(self.out)  # every path of the run folder comes from here
        self.lock_held = False  # set by run() while it holds the run folder's lock
        self.inputs: Optional[TrainingInputs] = None
        self.vset = None  # the held-out ValidationSet (setup), None without a split
        self.last_val: dict = {}  # the latest held-out metrics, with their step
        self.first_val: Optional[dict] = None  # the step-0 (untrained) held-out metrics of a fresh run
        self.main, self.rank, self.world = True, 0, 1  # set by setup() from accelerate

    def __getattr__(self, name: str):
        # after check(): recipe.store, recipe.groups, recipe.width ... are the checked inputs'
        inputs = self.__dict__.get("inputs")
        if inputs is not None and name in inputs.__dataclass_fields__:
            return getattr(inputs, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ check, before any compute
    def check(self) -> TrainingInputs:
        """Find every problem of the setup at once (options, store, groups, UNet width, run folder)
        and return what ``setup`` needs; raises SurpipeError listing them all."""
        found, problems = train_inputs.gather(self.cfg)
        env = [_tracker_problem(self.cfg.report_to), self.cfg.unet_fp8 and _fp8_problem(self.cfg.device)]
        problems = self.cfg.problems() + [p for p in env if p] + problems  # env: tracker installed? fp8 GPU?
        problems += self.run.resume_problems(self.cfg, found["store"], found["groups"], split=found.get("split"),
                                             world=dist_env().world_size)
        if self.cfg.pooled == "aligned" and found.get("store") is not None and found.get("pooled_width") is None:
            problems.append("--pooled aligned: the store has no SDXL pooled embeddings (an SD 1.x/2.x store); "
                            "use --pooled simple")
        if problems:
            raise SurpipeError("cannot start training:", problems)
        self.inputs = TrainingInputs(**found)
        return self.inputs

    # ------------------------------------------------------------------ setup
    def setup(self, inputs: Optional[TrainingInputs] = None) -> None:
        """Load the frozen UNet, build the adapter, projection, optimizer and schedule, and resume
        from the latest checkpoint of the run folder (``check`` runs first unless given its result)."""
        # heavy: torch, diffusers (train --help stays torch-free)
        import torch
        from diffusers import DDPMScheduler

        from surpipe.train.setup import build_trainables, load_unet, unet_for_loss  # heavy: torch, accelerate

        inputs = inputs or self.inputs or self.check()
        self.inputs = inputs
        cfg = self.cfg
        self._start_accelerator()
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # data flips, noise, timesteps
        self.unet = load_unet(cfg, self.runtime)
        self.loss_unet = unet_for_loss(self.unet, cfg)
        self.noise_scheduler = DDPMScheduler.from_config(inputs.sched_config)
        self.adapter, self.projection, self.optimizer, self.lr_scheduler = build_trainables(cfg, inputs, self.runtime)
        self.param_names = N.param_names(adapter=self._unwrapped("adapter"), projection=self._unwrapped("projection"))
        self.step, self.position = 0, None
        self.out.mkdir(parents=True, exist_ok=True)
        if self.lock_held:  # only then can no live writer own a half-written checkpoint
            self.run.clean_stale_tmp()
        latest = self.run.latest_checkpoint()
        if latest is not None:
            self.load_checkpoint(latest)
        # held-out numbers: the set is read once
        self.vset = during.validation_set(cfg, inputs, self.noise_scheduler) if self.main else None
        if self.main:
            # world_size: the global batch of the run is batch_size x world_size x grad_accum
            self.run.save_config(cfg, {"store_fingerprint": inputs.store.fingerprint, "world_size": self.world,
                                       "run": run_identity(cfg, inputs.store, inputs.groups, split=inputs.split)})
        self.accelerator.wait_for_everyone()

    def _start_accelerator(self) -> None:
        from surpipe.train.setup import start_accelerator  # heavy: torch, accelerate

        rt = start_accelerator(self.cfg, self.out, log_with=_log_with(self.cfg.report_to))
        self.accelerator, self.device = rt.accelerator, rt.device
        self.cfg = self.cfg.on_device(cuda=rt.device.type == "cuda")  # the saved config keeps "auto"
        self.weight_dtype, self.mixed_precision = rt.weight_dtype, rt.mixed_precision
        self.runtime = rt
        # data-parallel (torchrun / accelerate launch): rank 0 writes, every rank trains on its rows
        self.main, self.rank, self.world = (rt.accelerator.is_main_process, rt.accelerator.process_index,
                                            rt.accelerator.num_processes)

    def _unwrapped(self, name: str):
        return self.accelerator.unwrap_model(getattr(self, name))

    # ------------------------------------------------------------------ data
    def _stream(self):
        return training_stream(self.cfg, self.inputs, self.position, self.world, on_gpu=self.device.type == "cuda")

    def _stage(self, batch):  # this rank's rows of a global batch, on their way to the device (read ahead)
        from surpipe.train.setup import stage_batch  # heavy: torch
        return stage_batch(rank_rows(batch, self.rank, self.world), self.device)

    def _complete(self, staged):  # a staged batch with its random draws: the dict loss() takes
        from surpipe.train.setup import complete_batch  # heavy: torch

        b = self.cfg.batch_size
        share = (b * self.world, b * self.rank) if self.world > 1 else None
        return complete_batch(staged, self.inputs, self.device, self.gen, share)

    def _batch_to_tensors(self, batch):
        return self._complete(self._stage(batch))

    def loss(self, b, denoise: bool = True):
        """The three losses of one micro-batch and their weighted sum, as a dict of scalar tensors
        (``denoise=False``: the UNet term skipped, see surpipe.train.losses.composed_loss)."""
        from surpipe.train.losses import composed_loss  # heavy: torch

        return composed_loss(b, adapter=self.adapter, projection=self.projection, unet=self.loss_unet,
                             scheduler=self.noise_scheduler, generator=self.gen, cfg=self.cfg,
                             prediction_type=self.inputs.prediction_type, weight_dtype=self.weight_dtype,
                             denoise=denoise)

    def _needs_denoise(self) -> bool:
        """Whether this step computes the denoising term: always on the paper's gradient path; on
        the authors' (no gradient from it) the first and every log_denoise_every-th step, for the log."""
        cfg, step = self.cfg, self.step + 1
        return cfg.gradient_path == "paper" or step == 1 or step % cfg.log_denoise_every == 0

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train (or resume) to max_steps, then write the final adapter and the loss curve."""
        cfg = self.cfg
        if self.step >= cfg.max_steps:
            if self.run.final_adapter_stale():  # killed after the last checkpoint, before the adapter was written
                self.save_final()
            if self.main:
                print(f"nothing to do: {self.out} already has {self.step} of {cfg.max_steps} steps")
            return {"step": self.step, "resumed": True, "nothing_to_do": True}
        from surpipe.train.prefetch import DevicePrefetcher  # heavy: torch

        data = DevicePrefetcher(self._stream(), self._stage, self.device)
        start_step = self.step
        if self.main:  # rows a killed run logged after its last checkpoint (all, without one) are replayed: drop them
            train_log.drop_metrics_after(self.run.metrics, start_step if start_step else -1)
        train_log.init_trackers(self.accelerator, cfg.report_to, to_dict(cfg), self.out)
        logger = (train_log.RunLogger(self.run.metrics, self.run.log, self.accelerator) if self.main
                  else train_log.QuietLogger())
        bar = progress_bar(total=cfg.max_steps, initial=self.step, unit="step", desc="train",
                           disable=not (cfg.progress and self.main))
        if start_step:
            logger.log_text(f"resumed from step {start_step}")
            self.first_val = first_validation(self.run.metrics) if self.main else None
        elif self.vset is not None:  # the untrained adapter: what the held-out numbers start from
            self.last_val = self.first_val = {"step": 0, **self.evaluate_held_out()}
            logger.log_validation(self.last_val)
            if self.main:  # kept as the control eval --store compares with
                self.run.save_adapter(**self._modules(), name=self.run.untrained.name)
        t_run = time.perf_counter()
        try:
            last = self._loop(data, logger, bar)
        except SurpipeError as e:
            logger.log_text(f"error: {e}")
            raise
        finally:
            bar.close()
            logger.close()
        self.save_final()
        if not self.main:
            return {"step": self.step, "rank": self.rank}
        if cfg.loss_curve:
            _loss_curve(self.run.metrics, self.run.loss_curve, note=tiny_model_note(cfg.model))
        elapsed, n = time.perf_counter() - t_run, self.step - start_step
        print(f"trained {n} steps in {elapsed:.1f}s ({n / max(elapsed, 1e-9):.2f} steps/s); last loss "
              f"{last.get('loss', float('nan')):.5f}; adapter: {self.run.adapter}")
        if self.last_val:
            print(summary(self.last_val, len(self.vset), self.first_val))
        if cfg.keep_best and self.run.best.is_dir():
            print(f"best held-out adapter (val/prompt + val/llm {self.run.best_score():.5f}): {self.run.best}")
        return {"step": self.step, "steps_run": n, "seconds": round(elapsed, 2), "final": last,
                "adapter": str(self.run.adapter)}

    def _loop(self, data, logger, bar) -> dict:
        """Steps until max_steps; stops with a SurpipeError (before anything of the bad step or after
        it is logged or saved) on a non-finite loss, gradient or weight. The step's numbers stay on the
        device until the next logging, checkpoint or validation step, which reads them at once
        (docs/reliability.md, "Non-finite numbers")."""
        import torch  # heavy

        cfg = self.cfg
        last: dict = {}
        skipped = 0  # consecutive optimizer steps skipped by the fp16 loss scaler
        params = list(self.optimizer.param_groups[0]["params"])
        pending = N.PendingSteps(params, self.param_names)
        t_sync, since = time.perf_counter(), 0
        while self.step < cfg.max_steps:
            if self.world > 1:  # dropout masks from (seed, step, rank): a resume replays them without saved states
                torch.manual_seed(cfg.seed * 1_000_003 + self.step * 1009 + self.rank)
            terms, times, fetched = self._accumulate(data)
            te = time.perf_counter()
            # checked before clipping, which would spread a NaN norm over every gradient; not with fp16
            # loss scaling, where a non-finite gradient is the scaler's normal signal to skip the step
            with_grad = [i for i, p in enumerate(params) if p.grad is not None] if self.accelerator.scaler is None else []
            grads = (with_grad, N.finite_flags([params[i].grad for i in with_grad]))
            grad_norm = self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
            if self.accelerator.scaler is not None:  # fp16 loss scaling: overflows skip steps (reads the scale)
                skipped = skipped + 1 if getattr(self.optimizer, "step_was_skipped", False) else 0
                if skipped >= 30:  # the scale fell by 2**30: the gradients overflow even unscaled
                    self._stop_at(self.step + 1, f"the fp16 loss scaler skipped {skipped} steps in a row "
                                  "(non-finite gradients); try --mixed-precision bf16 or no")
            weights = N.finite_flags([p.detach() for p in params])
            self.lr_scheduler.step()
            lr = self.lr_scheduler.get_last_lr()[0]
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            since += 1
            self.position = fetched.position  # of the batch used, not of the one read ahead
            pending.add(self.step, terms, grads, torch.as_tensor(grad_norm), weights,
                        {"lr": lr, **times, "optimizer_s": time.perf_counter() - te, "epoch": self.position["epoch"]})
            bar.update(1)
            if self._sync_point():
                rows, problem = pending.settle(self._reduce_terms if self.world > 1 else None)
                if problem is not None:
                    self._stop_at(*problem)
                step_s = (time.perf_counter() - t_sync) / since  # the interval's mean: no per-step sync
                t_sync, since = time.perf_counter(), 0
                last = {**rows[-1], **N.host_means(rows), "step_s": step_s,
                        "samples_per_s": cfg.batch_size * cfg.grad_accum * self.world / step_s}
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    logger.log(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", wait=f"{last['data_wait_s'] / step_s:.0%}", refresh=False)
            self._after_step(logger)
        return last

    def _sync_point(self) -> bool:
        """Whether this step's numbers are read now: a logging, checkpoint, validation or last step."""
        cfg, s = self.cfg, self.step
        return (s % cfg.log_every == 0 or s == cfg.max_steps or s % cfg.checkpoint_every == 0
                or bool(cfg.validation_every and s % cfg.validation_every == 0))

    def _reduce_terms(self, terms):
        """The loss terms of the pending steps averaged over the data-parallel processes (the logged
        terms are the global batch's, as one process would log them)."""
        return self.accelerator.reduce(terms, reduction="mean")

    def _after_step(self, logger) -> None:
        """Checkpoint, held-out evaluation and the picture grid of this step, where they are due
        (always after the step's numbers were read and found finite)."""
        cfg = self.cfg
        if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
            if self.main:
                self.save_checkpoint()
            self.accelerator.wait_for_everyone()
        if self.vset is not None and (self.step == cfg.max_steps or (
                cfg.validation_every and self.step % cfg.validation_every == 0)):
            self.last_val = {"step": self.step, **self.evaluate_held_out()}
            logger.log_validation(self.last_val)
            if cfg.keep_best:
                self._keep_if_best(logger)
        if self.main and cfg.validation_every and cfg.validation_images and (
                self.step % cfg.validation_every == 0 or self.step == cfg.max_steps):
            grid = self.validate()
            if grid is not None:  # None: no held-out rows and no --validation-prompt to render
                logger.log_image("validation", grid, self.step)
        if self.world > 1 and cfg.validation_every and self.step % cfg.validation_every == 0:
            self.accelerator.wait_for_everyone()  # the others wait while rank 0 evaluates

    def _accumulate(self, data) -> tuple[dict, dict, object]:
        """Forward and backward of grad_accum micro-batches: the mean loss terms (0-d float64 tensors
        on the device, summed as Python floats would be), the host times spent and the last batch
        used (surpipe.train.prefetch.Fetched). The next batch is read while the device runs."""
        cfg = self.cfg
        times = {"data_wait_s": 0.0, "forward_s": 0.0, "backward_s": 0.0, "prefetch_s": 0.0}
        with_denoise = self._needs_denoise()
        sums = {"loss": 0.0, "denoise": 0.0 if with_denoise else None, "llm": 0.0, "prompt": 0.0}
        for i in range(cfg.grad_accum):
            ta = time.perf_counter()
            fetched = next(data)
            batch = self._complete(fetched.staged)
            tb = time.perf_counter()
            with self.accelerator.autocast():
                losses = self.loss(batch) if with_denoise else self.loss(batch, denoise=False)
            tc = time.perf_counter()
            self.accelerator.backward(losses["loss"] / cfg.grad_accum)
            td = time.perf_counter()
            if i + 1 < cfg.grad_accum or self.step + 1 < cfg.max_steps:  # never a read past the last step
                data.prefetch()
            times["data_wait_s"] += tb - ta
            times["forward_s"] += tc - tb
            times["backward_s"] += td - tc
            times["prefetch_s"] += time.perf_counter() - td
            for k in sums:
                if sums[k] is not None:
                    sums[k] = sums[k] + losses[k].detach().double() / cfg.grad_accum
        return sums, times, fetched

    def _stop_at(self, step: int, what: str) -> None:
        """Stop the run on a non-finite number at ``step`` (``what`` says where), keeping the last checkpoint."""
        from surpipe.train.setup import stopped_message  # heavy: torch

        raise SurpipeError(stopped_message(step, what, self.run.latest_checkpoint()))

    # ------------------------------------------------------------------ checkpoints and the final adapter
    def _modules(self) -> dict:
        return {"adapter": self._unwrapped("adapter"), "projection": self._unwrapped("projection")}

    def _refuse_nonfinite_weights(self, what: str) -> None:
        """Never write a NaN/Inf adapter or projection: raise naming the tensors instead."""
        bad = N.nonfinite_tensors(**self._modules())
        if bad:
            raise SurpipeError(f"refusing to write a {what} of {self.out} at step {self.step}: non-finite "
                               f"values in {N.listing(bad)}")

    def save_checkpoint(self) -> Path:
        """Adapter, projection, optimizer, LR schedule, step, RNG states and data position (atomic;
        older checkpoints pruned to keep_checkpoints)."""
        self._refuse_nonfinite_weights("checkpoint")
        return self.run.save_checkpoint(self.step, **self._modules(), optimizer=self.optimizer,
                                        lr_scheduler=self.lr_scheduler, scaler=self.accelerator.scaler, gen=self.gen,
                                        position=self.position, max_steps=self.cfg.max_steps,
                                        keep=self.cfg.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint (a damaged one raises SurpipeError naming it and the previous one)."""
        self.step, self.position = self.run.load_checkpoint(
            path, **self._modules(), optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            scaler=self.accelerator.scaler, gen=self.gen, num_blocks=self.inputs.store.num_blocks,
            block_rows=self.inputs.store.block_rows)
        if self.main:
            print(f"resuming {self.out} from {path.name} (step {self.step})")

    def save_final(self) -> None:
        """The final adapter in ``OUT/adapter`` (save_pretrained layout) and the projection."""
        self._refuse_nonfinite_weights("final adapter")
        if self.main:
            self.run.save_adapter(**self._modules())
        self.accelerator.wait_for_everyone()

    def _keep_if_best(self, logger) -> None:
        self._refuse_nonfinite_weights("best adapter")
        score = during.keep_if_best(self.run, self.last_val, self.step, self._modules())
        if score is not None:
            logger.log_text(f"best held-out score {score:.5f} at step {self.step}: {self.run.best}")

    # ------------------------------------------------------------------ held-out validation, pictures

    def evaluate_held_out(self) -> dict:
        """The held-out metrics (surpipe.train.validation.metrics.METRICS) of the adapter as it is now, under
        the training autocast; draws nothing from the training random generators."""
        if self.vset is None:
            raise SurpipeError("no held-out rows: give --val-rows or --val-fraction")
        with self.accelerator.autocast():
            return evaluate(self._unwrapped("adapter"), self._unwrapped("projection"), self.unet,
                            self.noise_scheduler, self.vset, prediction_type=self.inputs.prediction_type,
                            min_snr_gamma=self.cfg.min_snr_gamma, prompt_target=self.cfg.prompt_target,
                            weight_dtype=self.weight_dtype, control_seed=self.cfg.val_seed,
                            select=during.selection_part(self.cfg, self.vset))

    def validate(self) -> Optional[Path]:
        """Render the validation prompts without and with the adapter (same seeds) into a grid."""
        return during.validation_grid(self.cfg, self.inputs, self._unwrapped("adapter"), self.unet, self.run,
                                      self.step, self.device, self.weight_dtype)
