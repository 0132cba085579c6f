#!/usr/bin/env python
"""Textual Inversion for Stable Diffusion 1.x, 2.x and SDXL.

Teaches a frozen text-to-image model a new word from a few photos: the word's rows in the
CLIP token embedding are the only weights trained, against the frozen UNet and VAE with the
ordinary denoising loss. Accepts the flags of diffusers' examples/textual_inversion scripts.

    accelerate launch textual_inversion.py --pretrained_model_name_or_path MODEL \
        --train_data_dir photos/ --placeholder_token "<cat-toy>" --initializer_token toy

With --concepts_list, one run learns several words, each from its own photos, with its own
rows, validation loss, early stopping and folder (read_concepts, Concept, sample_stream).

A run, as main() does it (holding --output_dir's lock, with SIGTERM, SIGINT and SIGHUP turned
into a checkpoint after the current step):
    args = parse_args()
    run = prepare(args, accelerator, stop)  # the plan, photos, models, the new word, cached latents, the state
    result = train(run)                     # the loop, nothing else
    finish(run, result)                     # embeddings, full pipeline, card, Hub

The file reads core first: main and the stages (prepare, train, finish); the loss; randomness
and the batches; the run state, which makes the run's decisions; optimization; watching (which
decides nothing); then what the stages are made of: the plan (every derived number, once), the
data (what the loop reads, computed once), the new word, models (infer.py's model families
hold all that differs between SD and SDXL), photos and prompts, files, the Hub, stopping, and
last the command line. To change the loss, see denoising_loss; the
sampling, draw_batch and step_images; what is saved, save_outputs and save_checkpoint. Every
file is written through infer.py's atomic writers, so a crash never leaves half a file.

Why it is fast: every image is encoded by the VAE once, before the loop; each step samples
from the cached posterior (the distribution the reference script re-encodes for every
sample); prompts are tokenized once; the micro-batches of a gradient-accumulation step run
as one UNet call when memory allows; only the new rows carry gradients and optimizer state;
the host waits for the device only at log intervals.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

import infer

logger = logging.getLogger("textual_inversion")
HERE = Path(__file__).resolve().parent
CHECKPOINT_STATE = "training_state.pt"
UserError = infer.UserError  # one error type for both files: one line naming the flag or file, no traceback
first_line = infer.first_line


class Stopped(BaseException):
    """A signal stopped the run. Like KeyboardInterrupt it is no Exception, so no `except
    Exception` (a corrupt checkpoint, a Hub error) ever takes a stop for bad input. The exit
    status is 128 + the signal's number, as shells report a process a signal ended, so a
    scheduler sees a job to requeue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.status = 128 + signum


# ----------------------------------------------------------------------------------------
# The command: main, the stages in order, and accelerate (the launcher, the precision, the
# trackers).


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    # Every file written before a failed write is intact, so the run goes on from its checkpoint.
    infer.WRITE_FAILURE_ADVICE = "; once that is fixed, continue with --resume_from_checkpoint latest"
    try:
        run_training(parse_args(argv))
    except (UserError, Stopped) as e:
        if isinstance(e, UserError) or int(os.environ.get("RANK", "0")) == 0:  # one stop line per run
            print(f"error: {e}", file=sys.stderr)
        return e.status
    return 0


def run_training(args: argparse.Namespace) -> TrainResult:
    """prepare, train and finish, holding --output_dir's lock, with stop signals turned into a
    checkpoint (what main runs; tests run it in their own process)."""
    with StopSignals() as stop:
        accelerator = make_accelerator(args)
        try:
            with infer.OutputLock(Path(args.output_dir), accelerator.is_main_process):
                run = prepare(args, accelerator, stop)
                result = train(run)
                finish(run, result)
        finally:
            accelerator.end_training()  # the trackers' last records, a stopped run's too
    return result


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = resolve_report_to(args.report_to)
    config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir)
    )
    return Accelerator(mixed_precision=args.mixed_precision, log_with=report_to, project_config=config)


def resolve_report_to(value: str | None) -> list[str] | None:
    """Tracker names; a named tracker that is not installed is a one-line error."""
    from importlib.util import find_spec

    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",)}
    if value is None:  # not given: tensorboard if present, like the reference, else none
        return ["tensorboard"] if any(map(find_spec, packages["tensorboard"])) else None
    if value in ("none", ""):
        return None
    names = list(packages) if value == "all" else [v.strip() for v in value.split(",")]
    for name in names:
        if name not in packages:
            raise UserError(f"--report_to {value}: unknown tracker {name!r} (tensorboard, wandb, comet_ml, all, none)")
        if not any(map(find_spec, packages[name])):
            raise UserError(
                f"--report_to {name}: {name} is not installed; pip install {name}, or pass --report_to none"
            )
    return names


def tracker_config(args: argparse.Namespace, plan: Plan) -> dict:
    """The run's settings for trackers: the flags' plain values (never the Hub token), with the
    values the plan derived where a flag was left unset."""
    flags = {k: v for k, v in vars(args).items() if k != "hub_token" and isinstance(v, (int, float, str, bool))}
    return {**flags, **plan.derived()}


def quiet_libraries(accelerator) -> None:
    """The script's own lines on the local main process; the libraries' warnings and bars off."""
    import diffusers
    import transformers

    if not accelerator.is_local_main_process:
        logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()


def warn_if_one_cpu_thread(accelerator) -> None:
    """`accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise (even with --cpu where
    psutil counts one physical core): on a CPU, training then uses one core per process however
    many there are. The launcher keeps an OMP_NUM_THREADS it is given, and its own flag."""
    cores = os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    if accelerator.device.type == "cpu" and torch.get_num_threads() == 1 and cores > processes:
        threads = cores // processes
        logger.warning(
            "Training on the CPU with 1 thread per process while %d cores are free (OMP_NUM_THREADS=1); "
            "launch with `accelerate launch --num_cpu_threads_per_process %d ...` (or OMP_NUM_THREADS=%d)",
            cores,
            threads,
            threads,
        )


def resolve_seed(args: argparse.Namespace, accelerator) -> int:
    """--seed, or a fresh one shared by all processes (they must agree on the data order)."""
    if args.seed is not None:
        return args.seed
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]


# ----------------------------------------------------------------------------------------
# The run: prepare, train, finish.


@dataclass
class TrainResult:
    steps: int
    seconds: float
    samples_per_second: float
    first_step: int = 0  # the step this run started from (a resumed checkpoint's)


@dataclass(kw_only=True)
class Run:
    """All that train() and finish() work on, made once by prepare()."""

    args: argparse.Namespace
    plan: Plan
    accelerator: object
    stop: StopSignals
    models: Models
    placeholders: list[Placeholders]  # one per concept, in plan.concepts' order
    data: TrainingData
    state: RunState
    validation: Batch  # the fixed batch whose loss the state judges (best step, early stopping)
    optimization: Optimization
    fused: FusedBatches
    watch: Watch
    repo_id: str | None  # with --push_to_hub
    saved: dict[str, dict[str, int]]  # per concept, its run.json's record: the step each embedding file holds

    @property
    def out(self) -> Path:
        return Path(self.args.output_dir)

    def folder(self, concept: Concept) -> Path:
        """Where a concept's files go: --output_dir, or its own folder in it with --concepts_list."""
        return self.out / concept.name


def prepare(args: argparse.Namespace, accelerator, stop: StopSignals) -> Run:
    """Everything the loop reads, computed once. Everything that can fail on the user's input
    fails here, and before a model is built where it can; nothing in --output_dir is written
    before the models, the word and the photos are known to be good."""
    quiet_libraries(accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    warn_if_one_cpu_thread(accelerator)
    models_named = ["pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "tokenizer_name"]
    for flag in models_named + (["clip_model", "dino_model"] if args.validation_scores else []):
        infer.check_source(getattr(args, flag), f"--{flag}")  # a typo or an unreachable Hub: one line, at once
    entries = read_concepts(args)
    checkpoint = find_checkpoint(args)
    initializers = [read_initializer_embedding(flags) for _, flags in entries]
    source = read_model_source(args)
    photos = [list_photos(infer.photos_folder(flags.train_data_dir), flags.caption_extension) for _, flags in entries]
    plan = make_plan(
        args,
        accelerator.num_processes,
        accelerator.mixed_precision,
        source,
        initializers,
        [len(p) for p in photos],
        entries,
    )

    datasets = [dataset_from_args(concept, plan, p) for concept, p in zip(plan.concepts, photos)]
    decoded = [decode_images(dataset, args.dataloader_num_workers) for dataset in datasets]
    records = [
        {**record, "concept": concept.name} if concept.name else record
        for concept, dataset, examples in zip(plan.concepts, datasets, decoded)
        for record in dataset.records(examples)
    ]
    scoring = validation_scoring(args, accelerator, plan)
    models = load_models(args, accelerator.device, plan.weight_dtype, source)
    placeholders = [
        add_placeholder_tokens(models, concept.tokens, initializer or concept.args.initializer_token)
        for concept, initializer in zip(plan.concepts, initializers)
    ]
    data = encode_photos(
        [example for examples in decoded for example in examples],
        [prompts for dataset in datasets for prompts in dataset.photo_prompts],
        models,
        placeholders,
        unmasked_weight=args.unmasked_weight,
        sources={k: v for dataset in datasets for k, v in dataset.prompt_sources.items()},
        concept_of=[k for k, dataset in enumerate(datasets) for _ in range(len(dataset))],
    )
    del decoded
    if args.compile:
        compile_models(models, args.compile_backend)
    if any(c.args.validation_prompt for c in plan.concepts):
        models.vae.to(plan.weight_dtype)  # kept for validation images, at the UNet's precision
    else:
        models.vae = None  # encoded once; the loop never needs it
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()

    optimization = Optimization([rows for p in placeholders for rows in p.rows], args, plan, accelerator.device.type)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, models, placeholders, args, optimization)
        logger.info("Resuming from %s (step %d)", checkpoint, state.step)
        freeze_stopped(state, placeholders)
    else:
        concepts = [ConceptState() for _ in plan.concepts]
        state = RunState(step=0, seed=resolve_seed(args, accelerator), concepts=concepts)
    repo_id = create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        infer.remove_temp_files(out)
        accelerator.init_trackers("textual_inversion", config=tracker_config(args, plan))
        infer.write_text(out / "dataset.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        if plan.in_folders:  # what tells infer.py (and people) that the run learned several
            infer.write_concepts(out, [concept.name for concept in plan.concepts])
    watch = Watch(
        args=args, plan=plan, models=models, placeholders=placeholders, accelerator=accelerator, state=state,
        resumed=checkpoint is not None, scoring=scoring,
    )  # fmt: skip
    run = Run(
        args=args, plan=plan, accelerator=accelerator, stop=stop, models=models, placeholders=placeholders,
        data=data, state=state, optimization=optimization, fused=FusedBatches(plan.chunk), watch=watch,
        validation=validation_batch(state.seed, data, models.noise_scheduler.config.num_train_timesteps),
        repo_id=repo_id,
        saved={c.name: read_saved_steps(out / c.name) if checkpoint is not None else {} for c in plan.concepts},
    )  # fmt: skip
    if accelerator.is_main_process:
        for concept in plan.concepts:
            write_run_record(run, concept)
    logger.info("%s", startup_text(plan, data, records, placeholders, accelerator.device, state.seed))
    if checkpoint is not None and state.step >= plan.max_steps:
        logger.info(
            "%s is at step %d and --max_train_steps is %d: nothing to train; writing the outputs from it",
            checkpoint,
            state.step,
            plan.max_steps,
        )
    return run


def startup_text(
    plan: Plan,
    data: TrainingData,
    records: list[dict],
    placeholders: list[Placeholders],
    device: torch.device,
    seed: int,
) -> str:
    """The start-up line: what is trained, from what, how long, and on what hardware."""
    plural = infer.plural
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    concepts = plan.concepts
    several = f"{len(concepts)} concepts ({', '.join(c.tokens[0] for c in concepts)}), " if len(concepts) > 1 else ""
    return (
        f"{plan.family.name}: {several}{plural(data.num_images, 'photo')} "
        f"({sum(r['caption'] is not None for r in records)} captioned, {sum(r['mask'] is not None for r in records)} "
        f"masked, {plural(len(data.bucket_sizes), 'bucket')}), {plural(len(data.prompts), 'prompt')}, "
        f"{plural(plan.num_vectors, 'vector')} of width {'+'.join(str(r.shape[1]) for r in placeholders[0].rows)}, "
        f"{plural(plan.max_steps, 'step')} x {plural(plan.global_batch, 'sample')} "
        f"({plural(plan.world, 'process', 'processes')}), seed {seed}; on {where}, "
        f"precision {str(plan.weight_dtype).removeprefix('torch.')} (learned vectors float32), "
        f"{plural(torch.get_num_threads(), 'CPU thread')}" + (" per process" if plan.world > 1 else "")
    )


def train(run: Run) -> TrainResult:
    """The loop: one optimizer step per iteration; a stop signal ends it after the step, with a
    checkpoint.

    Accumulation and the gradient all-reduce are this script's own, with accelerate as the
    launcher, precision and trackers: a step's samples go through the UNet in as few calls as
    memory allows (FusedBatches: the gradient of accumulation, faster), and the only gradients
    are the new rows' N x D numbers, averaged directly (Optimization.step) instead of wrapping
    frozen models in DDP.
    """
    args, plan, state, watch, data = run.args, run.plan, run.state, run.watch, run.data
    device, rank = run.accelerator.device, run.accelerator.process_index
    generator = torch.Generator(device)
    balanced, stream = args.concept_sampling == "balanced", None
    num_timesteps = run.models.noise_scheduler.config.num_train_timesteps
    cadence = CheckpointCadence(args.checkpointing_steps, args.checkpointing_minutes, state.step)
    run.stop.outcome = None  # from here on a stop waits for the end of the current step
    watch.start(state.step)
    first_step, started, stopped = state.step, time.perf_counter(), False
    try:
        if state.step == 0:  # the baseline: how well the initializer word already explains the photos
            watch.record(0, validate(run, images=False), plot=False)
        while state.step < plan.max_steps and not state.stopped_early:
            if stream is None or stream.start != state.sampling_since:  # a concept stopped: the rest share the batch
                stream = sample_stream(state, plan.max_steps, data, plan.concepts, balanced)
            # Every process draws the whole global batch and keeps its own slice: N processes
            # compute exactly what one process would with N times the batch.
            generator.manual_seed(derive_seed(state.seed, STREAM_STEP, state.step))
            images, bucket = step_images(stream, state.step, plan.global_batch, device)
            batch = draw_batch(generator, images, data, num_timesteps, bucket)
            batch = batch[slice(rank * plan.per_process, (rank + 1) * plan.per_process)]
            loss = run.fused.backward(run.models, data, batch, run.optimization)
            run.optimization.step(plan.world)
            state.step += 1
            watch.step_done(loss)

            last = state.step == plan.max_steps
            record = watch.training(run.optimization.lr) if state.step % args.logging_steps == 0 or last else {}
            validating = state.step % plan.validation_steps == 0 or last
            if validating:
                record.update(validate(run))
            if record:
                watch.record(state.step, record, plot=validating)
            if run.accelerator.is_main_process:
                save_on_cadence(run, cadence, last)
            if last or state.stopped_early:
                break  # finished: a signal during this step lets the run end normally
            if run.stop.agreed(plan.world):
                stopped = True
                break
    finally:
        watch.close()
    if stopped:
        checkpoint_and_stop(run, cadence)
    seconds = time.perf_counter() - started
    speed = (state.step - first_step) * plan.global_batch / max(seconds, 1e-9)
    return TrainResult(state.step, seconds, speed, first_step)


def validate(run: Run, images: bool = True) -> dict:
    """The fixed-noise validation loss of each concept still training, which the state judges
    (best step, early stopping), and validation images (and their scores), which a stop drops at
    once, going on to the checkpoint."""
    batch, training = run.validation, torch.tensor([not c.stopped_early for c in run.state.concepts])
    if not training.all():  # a stopped concept's rows are frozen: its loss no longer moves
        batch = batch[training.to(batch.image.device)[run.data.concept_of[batch.image]]]
    losses = validation_loss(run.models, run.data, batch, run.fused.chunk)
    run.state.judge(losses, [p.rows for p in run.placeholders], run.args.early_stopping_patience)
    freeze_stopped(run.state, run.placeholders)
    concepts = run.plan.concepts
    record = {concept_key("val_loss", c): loss for c, loss in zip(concepts, losses) if loss is not None}
    if images and any(c.args.validation_prompt for c in concepts):
        try:
            with run.stop.at_once("while making validation images"):
                record.update(run.watch.images(run.state.step))
        except Stopped:
            logger.info("Stopping: validation images of step %d dropped", run.state.step)
    return record


def save_on_cadence(run: Run, cadence: CheckpointCadence, last: bool) -> None:
    """learned_embeds-steps-N every --save_steps, a checkpoint when one is due (main process)."""
    step = run.state.step
    if step % run.args.save_steps == 0:
        for concept, placeholders, state in zip(run.plan.concepts, run.placeholders, run.state.concepts):
            if not state.stopped_early or state.stopped_at == step:
                save_embeddings(run, concept, placeholders.rows, infer.steps_tag(step), step)
    if cadence.due(step, last):
        save_checkpoint(run)
        cadence.saved(step)


def checkpoint_and_stop(run: Run, cadence: CheckpointCadence) -> None:
    """The stop all processes agreed on: one checkpoint of this step, then Stopped."""
    step = run.state.step
    if run.accelerator.is_main_process and cadence.saved_step != step:
        save_checkpoint(run)
    run.accelerator.wait_for_everyone()  # no process exits (and gets the others killed) before it is written
    raise run.stop.stopped(
        f"at step {step}; saved {run.out / infer.checkpoint_name(step)}; to continue, run the same command with "
        "--resume_from_checkpoint latest"
    )


def finish(run: Run, result: TrainResult) -> None:
    """The files users expect, the full pipeline and the Hub. A stop during the last step lets
    the embedding be written; one during the full pipeline ends it, saying how to do the rest."""
    args, out = run.args, run.out
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        written = save_outputs(run)
        hub = prepare_hub_folder(run) if run.repo_id is not None else None
        if args.save_as_full_pipeline:
            later = f" and the Hub upload (push later with: hf upload {run.repo_id} {hub})" if hub else ""
            with run.stop.at_once(
                f"after the last step: the embedding is saved in {out}; skipped --save_as_full_pipeline{later}"
            ):
                save_full_pipeline(run)
        patience, concepts, states = args.early_stopping_patience, run.plan.concepts, run.state.concepts
        kept = "; ".join(
            (f"{c.tokens[0]} " if len(concepts) > 1 else "") + s.kept(run.state.step, patience)
            for c, s in zip(concepts, states)
        )
        logger.info(
            "Done: %s in %.1f s (%.1f samples/s); the run is at step %d; kept %s; files in %s",
            trained_steps_text(result.first_step, result.steps),
            result.seconds,
            result.samples_per_second,
            result.steps,
            kept,
            written[0].parent if len(concepts) == 1 else out,
        )
        if hub is not None:
            push_to_hub(run, hub)


def trained_steps_text(first_step: int, last_step: int) -> str:
    """What this run trained: all its steps, or the part after the checkpoint it resumed."""
    if first_step == 0:
        return infer.plural(last_step, "step")
    if first_step >= last_step:
        return "no steps (the checkpoint was already at the end)"
    return (
        f"steps {first_step + 1}-{last_step} ({infer.plural(last_step - first_step, 'step')}, resumed at {first_step})"
    )


# ----------------------------------------------------------------------------------------
# The loss.


def denoising_loss(models: Models, data: TrainingData, batch: Batch) -> torch.Tensor:
    """Per-sample MSE of the UNet's prediction (epsilon or v, per the scheduler config),
    weighted per latent pixel by the photo's mask. All samples share one bucket."""
    height, width = batch.noise.shape[-2:]
    bucket = (slice(None), slice(None), slice(None), slice(0, height), slice(0, width))
    latents = data.latent_mean[bucket][batch.image, batch.flip]
    latents = latents + data.latent_std[bucket][batch.image, batch.flip] * batch.posterior_noise
    scheduler = models.noise_scheduler
    noisy = scheduler.add_noise(latents, batch.noise, batch.timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = batch.noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, batch.noise, batch.timesteps)
    else:
        raise UserError(f"scheduler prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
    prompt = data.prompt_table[batch.image, batch.template]
    prompt_ids = [ids[prompt] for ids in data.prompt_ids]
    time_ids = None if data.time_ids is None else data.time_ids[batch.image]
    hidden, added = models.family.condition(models.text_encoder_forwards, prompt_ids, time_ids, models.clip_skip)
    prediction = models.unet_forward(
        noisy.to(models.weight_dtype), batch.timesteps, hidden.to(models.weight_dtype), added_cond_kwargs=added
    ).sample
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    return (error * data.loss_weight[bucket][batch.image, batch.flip]).mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------
# Randomness: a pure function of (seed, step), so a resumed run repeats the uninterrupted
# one exactly with nothing but the step stored, and any number of processes split the
# same global batch.


def derive_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


STREAM_ORDER, STREAM_STEP, STREAM_VALIDATION, STREAM_BUCKET, STREAM_RESAMPLE = 1, 2, 3, 4, 5


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(derive_seed(seed, STREAM_ORDER, epoch))
    return torch.randperm(length, generator=generator, device=device)


def sample_positions(seed: int, start: int, count: int, length: int, device) -> torch.Tensor:
    """Samples start..start+count of a stream of epochs over `length` slots: each epoch visits
    every slot once in a shuffled order, as a shuffled DataLoader would."""
    parts, position = [], start
    while position < start + count:
        epoch, offset = divmod(position, length)
        take = min(length - offset, start + count - position)
        parts.append(epoch_order(seed, epoch, length, device)[offset : offset + take])
        position += take
    return torch.cat(parts)


@dataclass
class SampleStream:
    """Which photos the steps from `start` on train. Each step's samples come from one aspect
    bucket (so every UNet call sees one shape), drawn once for all steps, weighted by the
    bucket's slots; each bucket is its own stream of epochs over its slots: every photo of each
    concept still training, its concept's --repeats times (with balanced sampling, as many
    times as gives every concept the same number of slots)."""

    start: int  # 0, or the step a concept stopped early from which the others share the batch
    seed: int
    slots: list[torch.Tensor]  # per bucket: the photo of each slot
    bucket: np.ndarray  # [steps - start]
    earlier: np.ndarray  # [steps - start]: how many earlier steps drew the same bucket


def sample_stream(
    state: RunState, steps: int, data: TrainingData, concepts: list[Concept], balanced: bool
) -> SampleStream:
    start = state.sampling_since
    seed = state.seed if start == 0 else derive_seed(state.seed, STREAM_RESAMPLE, start)
    training = [k for k, c in enumerate(state.concepts) if not c.stopped_early]
    repeats = [c.args.repeats for c in concepts]
    if balanced:  # every concept as many slots as the others: its photos x repeats scaled up to a common multiple
        shares = [n * r for n, r in zip(data.photos_per_concept, repeats)]
        common = math.lcm(*(shares[k] for k in training))
        repeats = [r * common // share for r, share in zip(repeats, shares)]
    slots = [
        torch.cat([members[data.concept_of[members] == k].repeat(repeats[k]) for k in training])
        for members in data.bucket_members
    ]
    counts = np.array([len(s) for s in slots], dtype=np.float64)
    draws = np.random.default_rng(derive_seed(seed, STREAM_BUCKET)).random(steps - start)  # a prefix never changes
    bucket = np.searchsorted(np.cumsum(counts) / counts.sum(), draws, side="right").clip(max=len(counts) - 1)
    earlier = np.zeros(steps - start, dtype=np.int64)
    for b in range(len(counts)):
        earlier[bucket == b] = np.arange(int((bucket == b).sum()))
    return SampleStream(start, seed, slots, bucket, earlier)


def step_images(stream: SampleStream, step: int, count: int, device) -> tuple[torch.Tensor, int]:
    """The photos of step `step`'s `count` samples, all from the step's bucket; and the bucket."""
    bucket = int(stream.bucket[step - stream.start])
    slots = stream.slots[bucket]
    seed = stream.seed if len(stream.slots) == 1 else derive_seed(stream.seed, STREAM_BUCKET, bucket)
    start = int(stream.earlier[step - stream.start]) * count
    return slots[sample_positions(seed, start, count, len(slots), device)], bucket


@dataclass
class Batch:
    image: torch.Tensor  # [B] photo index
    flip: torch.Tensor  # [B] 0 as-is, 1 mirrored
    template: torch.Tensor  # [B] column of the photo's prompt_table row
    timesteps: torch.Tensor  # [B]
    posterior_noise: torch.Tensor  # [B, C, h, w] draws the latent from the cached posterior
    noise: torch.Tensor  # [B, C, h, w] the diffusion noise; h, w: the batch's bucket

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitem__(self, s: slice | torch.Tensor) -> Batch:
        return Batch(*(getattr(self, f)[s] for f in self.__dataclass_fields__))

    def cropped(self, height: int, width: int) -> Batch:
        """The noise of a bucket of latent size height x width (the top left, as latents are stored)."""
        return replace(
            self, posterior_noise=self.posterior_noise[..., :height, :width], noise=self.noise[..., :height, :width]
        )


def draw_batch(
    generator: torch.Generator,
    image: torch.Tensor,
    data: TrainingData,
    num_timesteps: int,
    bucket: int | None = 0,
    timesteps: torch.Tensor | None = None,
) -> Batch:
    """The samples of photos `image`, drawn from `generator` in this order: flips, prompts,
    timesteps (uniform, unless given) and noises of `bucket`'s size (None: the largest, which
    every bucket crops)."""
    device, b = image.device, image.shape[0]
    size = data.latent_mean.shape[3:] if bucket is None else data.bucket_sizes[bucket]
    shape = (b, data.latent_mean.shape[2], *size)
    flip = torch.randint(0, 2, (b,), generator=generator, device=device)
    template = torch.randint(0, data.prompt_table.shape[1], (b,), generator=generator, device=device)
    if timesteps is None:
        timesteps = torch.randint(0, num_timesteps, (b,), generator=generator, device=device)
    posterior_noise = torch.randn(shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    return Batch(image, flip, template, timesteps, posterior_noise, noise)


# ----------------------------------------------------------------------------------------
# The run state: where the run stands, and the decisions made from it (the best step, early
# stopping, which rows are the result). A checkpoint holds all of it.


@dataclass
class ConceptState:
    """A concept's part of the run state: its best step so far and whether it stopped early."""

    best_loss: float | None = None  # the lowest validation loss so far, and when
    best_step: int | None = None
    best_rows: list[torch.Tensor] | None = None  # the rows at best_step (with --early_stopping_patience)
    evals_since_best: int = 0
    stopped_at: int | None = None  # the step early stopping froze its rows

    @property
    def stopped_early(self) -> bool:
        return self.stopped_at is not None

    def judge(self, step: int, loss: float, rows: list[torch.Tensor], patience: int | None) -> None:
        """A validation loss: the best step so far (its rows kept with `patience`), and whether
        `patience` evaluations without a better one stop the concept."""
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step, self.evals_since_best = loss, step, 0
            if patience:
                self.best_rows = [r.detach().clone() for r in rows]
        else:
            self.evals_since_best += 1
            if patience and self.evals_since_best >= patience:
                self.stopped_at = step

    def kept_rows(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """The rows the concept's result holds: the best step's with early stopping, else the last."""
        return rows if self.best_rows is None else self.best_rows

    def kept_step(self, step: int) -> int:
        return step if self.best_rows is None else self.best_step

    def kept(self, step: int, patience: int | None) -> str:
        """Which step the result holds, and why, in words."""
        if self.best_rows is None:
            return f"the last step {step}"
        why = (
            f"stopped early: no better validation loss in {infer.plural(patience, 'evaluation')}"
            if self.stopped_early
            else "the lowest validation loss"
        )
        return f"step {self.best_step} ({why}, {self.best_loss:.4f})"


@dataclass
class RunState:
    """Where a run stands. A checkpoint holds all of it, so a resumed run continues bit for bit."""

    step: int
    seed: int
    concepts: list[ConceptState] = field(default_factory=lambda: [ConceptState()])  # in plan.concepts' order
    sampling_since: int = 0  # the step the set of concepts still training last changed

    @property
    def stopped_early(self) -> bool:
        """Every concept stopped early: the run is over."""
        return all(c.stopped_early for c in self.concepts)

    def judge(self, losses: list[float | None], rows: list[list[torch.Tensor]], patience: int | None) -> None:
        """Each training concept's validation loss (see ConceptState.judge). When one stops while
        others train on, they share the batch from the next step on (sample_stream)."""
        before = [c.stopped_early for c in self.concepts]
        for concept, loss, concept_rows in zip(self.concepts, losses, rows):
            if loss is not None and not concept.stopped_early:
                concept.judge(self.step, loss, concept_rows, patience)
        if not self.stopped_early and [c.stopped_early for c in self.concepts] != before:
            self.sampling_since = self.step

    def as_dict(self) -> dict:
        concepts = [dict(vars(c), best_rows=c.best_rows and [r.cpu() for r in c.best_rows]) for c in self.concepts]
        return {"step": self.step, "seed": self.seed, "sampling_since": self.sampling_since, "concepts": concepts}

    @classmethod
    def from_dict(cls, saved: dict) -> RunState:
        return cls(**{**saved, "concepts": [ConceptState(**c) for c in saved["concepts"]]})


def freeze_stopped(state: RunState, placeholders: list[Placeholders]) -> None:
    """A concept that stopped early keeps its rows: no gradient reaches them, so no optimizer
    step moves them, even from another concept's captions that name its word."""
    for concept, words in zip(state.concepts, placeholders):
        if concept.stopped_early:
            for rows in words.rows:
                rows.requires_grad_(False)


# ----------------------------------------------------------------------------------------
# Optimization: AdamW over the new rows alone, its lr schedule, the fp16 loss scaler, and
# the fused micro-batches of a step.


class Optimization:
    """The optimizer, lr schedule and loss scaler of the new rows: all a checkpoint resumes."""

    def __init__(self, rows: list[torch.Tensor], args: argparse.Namespace, plan: Plan, device_type: str):
        from diffusers.optimization import get_scheduler

        self.rows, self.max_norm = rows, args.max_embedding_norm
        self.optimizer = torch.optim.AdamW(
            rows,
            lr=plan.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )
        self.scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=plan.max_steps,
            num_cycles=args.lr_num_cycles,
        )
        self.scaler = torch.amp.GradScaler(device_type, enabled=plan.weight_dtype == torch.float16)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, world: int) -> None:
        """Average the rows' gradients over the processes, step, and keep the norms in bounds."""
        training = [rows for rows in self.rows if rows.requires_grad]  # a concept stopped early: frozen
        if world > 1:
            for rows in training:
                torch.distributed.all_reduce(rows.grad)
                rows.grad /= world
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.max_norm:
            clamp_norms(training, self.max_norm)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["grad_scaler"])


@torch.no_grad()
def clamp_norms(rows: list[torch.Tensor], max_norm: float) -> None:
    """Project each learned vector back inside the ball of radius max_norm (no host sync)."""
    for r in rows:
        r.mul_((max_norm / r.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0))


def accumulate_gradients(models: Models, data: TrainingData, batch: Batch, chunk: int, scaler) -> torch.Tensor:
    """Backward the batch's mean loss in chunks of `chunk` samples; return the loss (on device).

    Each chunk's loss is weighted by its share of the batch, so any chunking gives the
    gradient of the mean over the whole batch: the same as gradient accumulation.
    """
    total = torch.zeros((), device=batch.image.device)
    for start in range(0, len(batch), chunk):
        part = batch[slice(start, start + chunk)]
        loss = denoising_loss(models, data, part).sum() / len(batch)
        scaler.scale(loss).backward()
        total += loss.detach()
    return total


class FusedBatches:
    """A step's samples in as few UNet calls as memory allows: `chunk` at a time, halved for
    the rest of the run whenever the GPU runs out of memory."""

    def __init__(self, chunk: int):
        self.chunk = chunk

    def backward(self, models: Models, data: TrainingData, batch: Batch, optimization: Optimization) -> torch.Tensor:
        while True:
            try:
                return accumulate_gradients(models, data, batch, self.chunk, optimization.scaler)
            except torch.OutOfMemoryError:
                if self.chunk == 1:
                    raise
                optimization.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                self.chunk = (self.chunk + 1) // 2
                logger.warning("Out of GPU memory; retrying with --micro_batch_size %d", self.chunk)


@dataclass
class CheckpointCadence:
    """When a checkpoint is due: every --checkpointing_steps, and when --checkpointing_minutes
    have passed since the last one (except at the last step, whose outputs are the result)."""

    steps: int
    minutes: float
    saved_step: int
    saved_at: float = field(default_factory=time.monotonic)

    def due(self, step: int, last: bool) -> bool:
        minutes = 0 if last else (time.monotonic() - self.saved_at) / 60
        return step % self.steps == 0 or 0 < self.minutes <= minutes

    def saved(self, step: int) -> None:
        self.saved_step, self.saved_at = step, time.monotonic()


# ----------------------------------------------------------------------------------------
# Watching a run: a validation loss that means something, validation images, metrics, a plot.


def validation_batch(seed: int, data: TrainingData, num_timesteps: int, per_photo: int = 4) -> Batch:
    """A fixed batch: every photo at `per_photo` timesteps spread evenly over the schedule,
    each with a flip, prompt and noise drawn once from the seed.

    With noise and timesteps fixed, the loss only moves when the embedding does: unlike the
    training loss, which the random timestep dominates, it tracks what is being learned
    (Voronov et al., "Is This Loss Informative?", NeurIPS 2023).
    """
    device = data.latent_mean.device
    generator = torch.Generator(device).manual_seed(derive_seed(seed, STREAM_VALIDATION))
    count = data.num_images * per_photo
    strata = torch.arange(per_photo, device=device).repeat(data.num_images)
    jitter = torch.rand(count, generator=generator, device=device)
    timesteps = ((strata + jitter) * num_timesteps / per_photo).long().clamp(max=num_timesteps - 1)
    image = torch.arange(data.num_images, device=device).repeat_interleave(per_photo)
    return draw_batch(generator, image, data, num_timesteps, bucket=None, timesteps=timesteps)


@torch.no_grad()
def validation_loss(models: Models, data: TrainingData, batch: Batch, chunk: int) -> list[float | None]:
    """Each concept's mean loss over its samples in the batch (None: it has none), bucket by
    bucket, in calls of exactly `chunk` samples (a bucket's last call wraps around and its
    repeats are dropped), so a compiled UNet sees one shape per bucket."""
    bucket_of = torch.tensor(data.bucket_of)[batch.image.cpu()]
    concept_of = data.concept_of[batch.image]
    totals = [0.0] * len(data.photos_per_concept)
    for bucket, (height, width) in enumerate(data.bucket_sizes):
        positions = (bucket_of == bucket).nonzero().flatten().to(batch.image.device)
        n = len(positions)
        for start in range(0, n, chunk):
            index = positions[torch.arange(start, start + chunk, device=positions.device) % n]
            part = batch[index].cropped(height, width)
            losses, owners = denoising_loss(models, data, part)[: n - start], concept_of[index[: n - start]]
            for k in range(len(totals)):
                totals[k] += float(losses[owners == k].sum())
    counts = torch.bincount(concept_of, minlength=len(totals)).tolist()
    return [total / count if count else None for total, count in zip(totals, counts)]


def validation_pipeline(models: Models):
    """A pipeline around the modules already in memory (no reload from disk)."""
    from diffusers import DPMSolverMultistepScheduler

    family = models.family
    parts = {
        **dict(zip(family.encoders, models.text_encoders)),
        **dict(zip(family.tokenizers, models.tokenizers)),
        "unet": models.unet,
        "vae": models.vae,
        "scheduler": DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config),
    }
    pipe = family.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def validation_images(
    pipe,
    prompts: list[str],
    count: int,
    seed: int,
    size: int,
    steps: int,
    clip_skip: int = 0,
) -> list[list]:
    """`count` images per prompt in one batched call, each from its own fixed seed, so the
    grids of different steps show the same noise and can be compared."""
    device = pipe.unet.device
    generators = [torch.Generator(device).manual_seed(s) for s in validation_seeds(seed, count)] * len(prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # SDXL's fp16 VAE upcast announces a deprecation
        images = pipe(
            prompt=[p for p in prompts for _ in range(count)],
            generator=generators,
            num_inference_steps=steps,
            height=size,
            width=size,
            clip_skip=clip_skip or None,
        ).images
    return [images[i * count : (i + 1) * count] for i in range(len(prompts))]


def validation_seeds(seed: int, count: int) -> list[int]:
    """The seed of each column of the validation grid: the same at every step."""
    return [derive_seed(seed, STREAM_VALIDATION, k) for k in range(count)]


def validation_grid_settings(args: argparse.Namespace, models: Models, pipe, seed: int, step: int) -> dict:
    """What a validation grid was made with, for its PNG: A1111's infotext (its PNG Info reads
    the prompts, sampler, steps, CFG, seeds, size and model) and the whole, as JSON."""
    return {
        "prompts": list(args.validation_prompt),
        "steps": args.validation_inference_steps,
        "guidance_scale": infer.default_guidance_scale(pipe),
        "scheduler": "dpm++",  # validation_pipeline's DPMSolverMultistepScheduler, as infer.py names it
        **infer.a1111_sampler(pipe.scheduler),
        "seeds": validation_seeds(seed, args.num_validation_images),
        "width": args.resolution,
        "height": args.resolution,
        "model": args.pretrained_model_name_or_path,
        "dtype": str(models.weight_dtype).removeprefix("torch."),
        **({"clip_skip": models.clip_skip} if models.clip_skip else {}),
        "token": args.placeholder_token,
        "embedding_step": step,
    }


def validation_scoring(
    args: argparse.Namespace, accelerator, plan: Plan
) -> tuple[infer.Scorers, list[infer.References]] | None:
    """--validation_scores, on the main process: `infer.py eval`'s scorers and each concept's
    photos' features, made once, before the models load (a scorer missing offline fails first)."""
    if not (args.validation_scores and accelerator.is_main_process):
        return None
    scorers = infer.Scorers(args.clip_model, args.dino_model, accelerator.device)
    photos = [infer.read_photos(c.args.train_data_dir, "--train_data_dir") for c in plan.concepts]
    logger.info(
        "Validation scores: %s and %s against %s",
        args.clip_model,
        args.dino_model,
        infer.plural(sum(map(len, photos)), "photo"),
    )
    return scorers, [scorers.references(p) for p in photos]


def plot_run(history: list[dict], path: Path) -> bool:
    """loss.png: training loss (raw and smoothed), validation loss and embedding norm (each
    concept's), each panel's legend beside it. Returns False when matplotlib is not installed
    (it is optional)."""

    def series(key: str) -> list[tuple[str, tuple, tuple]]:
        """(concept name, steps, values) of `key`: one series in a one-concept run, else one per concept."""
        keys = dict.fromkeys(k for h in history for k in h if k.partition("/")[0] == key)
        return [(k.partition("/")[2], *zip(*[(h["step"], h[k]) for h in history if k in h])) for k in keys]

    def label(text: str, name: str) -> str:
        return f"{text}, {name}" if name else text

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val, norms, medians = series("val_loss"), series("embedding_norm"), series("vocab_median_norm")
    scored = series("clip_i")
    panels = 3 if scored else 2
    made = infer.new_figure(panels, 1, figsize=(10, 3 * panels), sharex=True, height_ratios=[2, 1, 1][:panels])
    if made is None:
        return False
    figure, axes = made
    top, bottom = axes[0], axes[1]
    if train:
        steps, losses = zip(*train)
        smooth, value = [], losses[0]
        for loss in losses:
            value = 0.9 * value + 0.1 * loss
            smooth.append(value)
        top.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1)
        top.plot(steps, smooth, color="tab:blue", label="training loss (smoothed)")
    for k, (name, steps, losses) in enumerate(val):  # several concepts: each its own colour, never the loss's blue
        color = "tab:orange" if len(val) == 1 else f"C{k + 1}"
        top.plot(steps, losses, "o-", color=color, label=label("validation loss (fixed noise)", name))
    top.set_ylabel("loss")
    top.legend(**infer.LEGEND_BESIDE)
    for k, (name, steps, norm) in enumerate(norms):
        color = "tab:green" if len(norms) == 1 else f"C{k + 1}"
        bottom.plot(steps, norm, color=color, label=label("learned vectors' norm", name))
    for _, steps, median in medians:
        bottom.plot(steps, median, "--", color="gray", label="vocabulary median")
    if norms:
        bottom.legend(**infer.LEGEND_BESIDE)
    bottom.set_ylabel("L2 norm")
    if scored:  # --validation_scores: fidelity (CLIP-I, DINO) against editability (CLIP-T)
        for key, text in (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino", "DINO")):
            for name, steps, values in series(key):
                axes[2].plot(steps, values, "o-", label=label(text, name))
        axes[2].set_ylabel("score (validation images)")
        axes[2].legend(**infer.LEGEND_BESIDE)
    axes[-1].set_xlabel("step")
    infer.save_figure(figure, path)
    return True


class Watch:
    """What a person follows during a run, observed and never steered: the progress bar; every
    --logging_steps the training loss, lr, speed and embedding norm; every validation the
    validation loss (which the run state judges) and, on the main process, validation images;
    all of it in metrics.jsonl, the trackers and loss.png."""

    def __init__(
        self,
        *,
        args: argparse.Namespace,
        plan: Plan,
        models: Models,
        placeholders: list[Placeholders],
        accelerator,
        state: RunState,
        resumed: bool,
        scoring: tuple[infer.Scorers, list[infer.References]] | None = None,
    ):
        self.scoring = scoring  # --validation_scores, on the main process
        self.plan, self.models, self.placeholders = plan, models, placeholders
        self.accelerator, self.seed, self.state = accelerator, state.seed, state
        self.out = Path(args.output_dir)
        self.main = accelerator.is_main_process
        self.vocab_median_norm = [
            float(vocabulary(e).weight.float().norm(dim=1).median()) for e in models.text_encoders
        ]
        self.pipe = None
        self.last_grids: dict[str, Path] = {}  # each concept's newest validation grid
        self.plotted = self.said_no_plot = False
        metrics = self.out / "metrics.jsonl"
        self.history = [r for r in infer.read_jsonl(metrics) if r.get("step", 0) <= state.step] if resumed else []
        if self.main:  # a resumed run continues the log from its checkpoint's step
            infer.write_text(metrics, "".join(json.dumps(h) + "\n" for h in self.history))
        self.progress = None
        self.loss_sum, self.loss_count = torch.zeros((), device=accelerator.device), 0

    def start(self, step: int) -> None:
        from tqdm.auto import tqdm

        enabled = self.accelerator.is_local_main_process
        self.progress = tqdm(
            total=self.plan.max_steps, initial=step, desc="Steps", disable=not enabled, dynamic_ncols=True
        )
        self.window_start, self.window_steps = time.perf_counter(), 0

    def step_done(self, loss: torch.Tensor) -> None:
        """One optimizer step: its loss stays on the device until the next logging step."""
        self.loss_sum += loss
        self.loss_count += 1
        self.window_steps += 1
        self.progress.update(1)

    def training(self, lr: float) -> dict:
        """The mean loss since the last logging step (the one host sync per interval), lr, speed, norms."""
        loss = (self.loss_sum / self.loss_count).item()
        now = time.perf_counter()
        speed = self.window_steps * self.plan.global_batch / (now - self.window_start)
        self.loss_sum.zero_()
        self.loss_count, self.window_start, self.window_steps = 0, now, 0
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.1f}")
        record = {"loss": loss, "lr": lr, "samples_per_second": speed}
        for concept, placeholders in zip(self.plan.concepts, self.placeholders):
            for i, (rows, median) in enumerate(zip(placeholders.rows, self.vocab_median_norm)):
                suffix = f"_{i + 1}" if i else ""
                record[concept_key(f"embedding_norm{suffix}", concept)] = float(rows.detach().norm(dim=1).mean())
                record[f"vocab_median_norm{suffix}"] = median
        return record

    def images(self, step: int) -> dict:
        """Validation images of each concept with --validation_prompt (main process): a grid in its
        folder and the trackers'; with --validation_scores, their mean CLIP-I, CLIP-T and DINO
        against the concept's photos."""
        if not self.main:
            return {}
        record = {}
        for k, (concept, progress) in enumerate(zip(self.plan.concepts, self.state.concepts)):
            frozen = progress.stopped_early and progress.stopped_at < step  # its images no longer change
            if concept.args.validation_prompt and not frozen:
                references = self.scoring[1][k] if self.scoring else None
                scores = self.concept_images(concept, step, references)
                record.update((concept_key(key, concept), value) for key, value in scores.items())
        return record

    def concept_images(self, concept: Concept, step: int, references: infer.References | None) -> dict:
        args = concept.args
        if self.pipe is None:
            self.pipe = validation_pipeline(self.models)
        rows = validation_images(
            self.pipe,
            args.validation_prompt,
            args.num_validation_images,
            self.seed,
            args.resolution,
            args.validation_inference_steps,
            self.models.clip_skip,
        )
        folder = self.out / concept.name / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        grid = infer.labelled_grid(rows, args.validation_prompt, f"step {step}")
        settings = validation_grid_settings(args, self.models, self.pipe, self.seed, step)
        self.last_grids[concept.name] = infer.write_png(folder / f"step-{step}.png", grid, settings)
        tag = concept_key("validation", concept)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                pixels = np.stack([np.asarray(image) for row in rows for image in row])
                tracker.writer.add_images(tag, pixels, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                captioned = [wandb.Image(i, caption=p) for p, row in zip(args.validation_prompt, rows) for i in row]
                tracker.log({tag: captioned}, step=step)
        if references is None:
            return {}
        texts = [p.replace(args.placeholder_token, concept.class_word) for p in args.validation_prompt]
        count = args.num_validation_images
        scores = self.scoring[0].score(
            [i for row in rows for i in row], [t for t in texts for _ in range(count)], references
        )
        return {key: float(values.double().mean()) for key, values in scores.items()}

    def record(self, step: int, record: dict, plot: bool) -> None:
        record = {"step": step, **record}
        self.history.append(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self.main:
            infer.append_text(self.out / "metrics.jsonl", json.dumps(record) + "\n")
            if plot:
                self.plot()

    def plot(self) -> None:
        if plot_run(self.history, self.out / "loss.png"):
            self.plotted = True
        elif not self.said_no_plot:
            logger.info("matplotlib is not installed, so loss.png was skipped (pip install matplotlib)")
            self.said_no_plot = True

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


# ----------------------------------------------------------------------------------------
# The plan: every number the run derives, computed once from the flags, the model's configs
# and the photo count, before any weight is loaded.

DEFAULT_STEPS = 5000


@dataclass(frozen=True)
class Concept:
    """One concept the run learns: its flags (the command line's, under its --concepts_list
    entry), its new word's tokens and its folder in --output_dir."""

    name: str  # its folder in --output_dir; "" without --concepts_list (the folder itself)
    args: argparse.Namespace
    tokens: list[str]  # one per vector

    @property
    def word(self) -> str:
        """The new word as prompts hold it: all its vector tokens."""
        return " ".join(self.tokens)

    @property
    def class_word(self) -> str | None:
        """What stands in for the new word in CLIP-T's text: --class_word, else the initializer."""
        return self.args.class_word or self.args.initializer_token


def concept_key(key: str, concept: Concept) -> str:
    """A metric's name for one concept: as it is in a one-concept run, else key/name."""
    return f"{key}/{concept.name}" if concept.name else key


@dataclass(frozen=True)
class Plan:
    family: type[infer.ModelFamily]
    concepts: list[Concept]
    max_steps: int
    world: int  # processes
    per_process: int  # samples per optimizer step and process: batch x accumulation
    chunk: int  # samples per UNet call to start with (--micro_batch_size; halves on out-of-memory)
    learning_rate: float  # scaled by the global batch with --scale_lr
    validation_steps: int
    buckets: list[tuple[int, int]] | None  # (w, h) in pixels, with --aspect_buckets
    weight_dtype: torch.dtype  # of the frozen models; the trained rows stay fp32
    extension: str  # of the embedding files: .safetensors, or .bin with --no_safe_serialization

    @property
    def num_vectors(self) -> int:
        return sum(len(c.tokens) for c in self.concepts)

    @property
    def global_batch(self) -> int:
        return self.per_process * self.world

    @property
    def in_folders(self) -> bool:
        """--concepts_list: each concept's files in its own folder of --output_dir, listed in concepts.json."""
        return bool(self.concepts[0].name)

    def derived(self) -> dict:
        """The plan's values for trackers (what the run really uses, where a flag was left unset)."""
        return {
            "num_vectors": self.num_vectors,
            "max_train_steps": self.max_steps,
            "processes": self.world,
            "global_batch": self.global_batch,
            "micro_batch_size": self.chunk,
            "scaled_learning_rate": self.learning_rate,
            "validation_steps": self.validation_steps,
            "buckets": len(self.buckets) if self.buckets else 0,
            "weight_dtype": str(self.weight_dtype).removeprefix("torch."),
            "family": self.family.name,
            **({"concepts": len(self.concepts)} if len(self.concepts) > 1 else {}),
        }


def make_plan(
    args: argparse.Namespace,
    world: int,
    mixed_precision: str,
    source: infer.ModelSource,
    initializers: list[infer.Embedding | None],
    photo_counts: list[int],
    entries: list[tuple[str, argparse.Namespace]] | None = None,
) -> Plan:
    """The run's numbers, with a one-line error for every flag that does not fit the model.
    `entries` are the concepts (read_concepts; default: the command line's one), each with its
    initializer embedding (or None) and photo count."""
    concepts = []
    for (name, flags), initializer in zip(entries or [("", args)], initializers):
        num_vectors = flags.num_vectors or (initializer.num_vectors if initializer is not None else 1)
        if initializer is not None and num_vectors != initializer.num_vectors:
            raise UserError(
                f"--num_vectors {flags.num_vectors}: the --initializer_embedding {flags.initializer_embedding} has "
                f"{initializer.num_vectors}; leave --num_vectors out, or give {initializer.num_vectors}"
            )
        concepts.append(Concept(name, flags, infer.vector_tokens(flags.placeholder_token, num_vectors)))
    infer.check_clip_skip(args.clip_skip, source.text_layers)
    buckets = None
    if args.aspect_buckets:
        if args.bucket_step % source.vae_scale:
            factor = source.vae_scale
            raise UserError(
                f"--bucket_step {args.bucket_step} must be a multiple of the VAE's downscaling factor {factor}"
            )
        smallest = args.min_bucket_resolution or args.resolution // 2
        largest = args.max_bucket_resolution or args.resolution * 2
        if smallest > largest:
            raise UserError(f"--min_bucket_resolution {smallest} is more than --max_bucket_resolution {largest}")
        buckets = bucket_sizes(args.resolution, args.bucket_step, smallest, largest)
    per_process = args.train_batch_size * args.gradient_accumulation_steps
    slots = sum(count * c.args.repeats for count, c in zip(photo_counts, concepts))  # an epoch's samples
    steps_per_epoch = math.ceil(slots / (per_process * world))
    if args.max_train_steps is not None:
        max_steps = args.max_train_steps
    else:  # the reference can never use its epochs flag: here it counts when the steps are not given
        max_steps = args.num_train_epochs * steps_per_epoch if args.num_train_epochs else DEFAULT_STEPS
    return Plan(
        family=source.family,
        concepts=concepts,
        max_steps=max_steps,
        world=world,
        per_process=per_process,
        chunk=args.micro_batch_size or per_process,
        learning_rate=args.learning_rate * (per_process * world if args.scale_lr else 1),
        validation_steps=args.validation_steps
        if args.validation_epochs is None
        else args.validation_epochs * steps_per_epoch,
        buckets=buckets,
        weight_dtype={"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision],
        extension=".bin" if args.no_safe_serialization else ".safetensors",
    )


# ----------------------------------------------------------------------------------------
# The training data: what the loop reads each step, computed once (every photo of every concept).


@dataclass
class TrainingData:
    # [images, 2 (as-is, mirrored), C, h, w], in the UNet's latent scale. With aspect buckets
    # h, w are the largest bucket's and each photo's latents sit at the top left.
    latent_mean: torch.Tensor
    latent_std: torch.Tensor  # same shape
    prompt_ids: list[torch.Tensor]  # per tokenizer: [prompts, 77]
    time_ids: torch.Tensor | None  # SDXL: [images, 6]
    prompts: list[str]
    # [images, K]: photo i's prompts (rows of prompt_ids), each as often. Default: all, in order.
    prompt_table: torch.Tensor | None = None
    # [images, 2, 1, h, w]: the loss weight per latent pixel (masks), mean 1 over the photo's
    # bucket. Default: ones.
    loss_weight: torch.Tensor | None = None
    bucket_sizes: list[tuple[int, int]] | None = None  # latent (h, w) per bucket. Default: one, h x w
    bucket_of: list[int] | None = None  # each photo's bucket
    concept_of: torch.Tensor | None = None  # [images]: each photo's concept. Default: all the first
    bucket_members: list[torch.Tensor] = field(init=False)  # the photos of each bucket
    photos_per_concept: list[int] = field(init=False)

    def __post_init__(self):
        images, device = self.latent_mean.shape[0], self.latent_mean.device
        if self.prompt_table is None:
            self.prompt_table = torch.arange(len(self.prompts), device=device).expand(images, -1)
        if self.loss_weight is None:
            self.loss_weight = torch.ones(images, 2, 1, *self.latent_mean.shape[3:], device=device)
        if self.bucket_sizes is None:
            self.bucket_sizes, self.bucket_of = [tuple(self.latent_mean.shape[3:])], [0] * images
        if self.concept_of is None:
            self.concept_of = torch.zeros(images, dtype=torch.long, device=device)
        self.photos_per_concept = torch.bincount(self.concept_of).tolist()
        self.bucket_members = [
            torch.tensor([i for i, b in enumerate(self.bucket_of) if b == k], dtype=torch.long, device=device)
            for k in range(len(self.bucket_sizes))
        ]

    @property
    def num_images(self) -> int:
        return self.latent_mean.shape[0]


def top_left_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Tensors [..., h_i, w_i] stacked into one [n, ..., max h, max w], each at the top left."""
    height, width = max(p.shape[-2] for p in parts), max(p.shape[-1] for p in parts)
    out = parts[0].new_zeros(len(parts), *parts[0].shape[:-2], height, width)
    for i, part in enumerate(parts):
        out[i, ..., : part.shape[-2], : part.shape[-1]] = part
    return out


@torch.no_grad()
def encode_photos(
    examples: list[dict],
    prompts: list[str] | list[list[str]],
    models: Models,
    placeholders: Placeholders | list[Placeholders],
    *,
    unmasked_weight: float = 0.1,
    sources: dict[str, str] | None = None,
    concept_of: list[int] | None = None,
) -> TrainingData:
    """VAE posteriors of every photo and its mirror, their masks on the latent grid, and the
    prompts' token ids, on device. `prompts` are each photo's (or one list for all);
    `sources` names the file a prompt came from, for messages; `concept_of` is each photo's
    concept (an index into `placeholders`, one per concept).

    Sampling mean + std * noise each step draws from the same distribution as encoding the
    photo every step, as the reference script does, at none of the cost.
    """
    vae = models.vae
    device = next(vae.parameters()).device
    means, stds, weights = [], [], []
    for example in examples:
        # One view at a time: the VAE's activations at full resolution dominate peak memory
        # (gigabytes for SDXL at 1024 px in fp32), and this runs once, so batching buys nothing.
        views = [vae.encode(view[None].to(device, torch.float32)).latent_dist for view in example["pixel_values"]]
        means.append(torch.cat([v.mean for v in views]))
        stds.append(torch.cat([v.std for v in views]))
        weight = torch.ones(2, 1, *means[-1].shape[2:], device=device)
        if example.get("mask") is not None:  # area average onto the latent grid
            coverage = F.adaptive_avg_pool2d(example["mask"].to(device), means[-1].shape[2:])
            weight = unmasked_weight + (1 - unmasked_weight) * coverage
        weights.append(weight / weight.mean(dim=(1, 2, 3), keepdim=True))
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latent_mean = (top_left_padded(means) - shift) * scale
    latent_std = top_left_padded(stds) * scale
    bucket_sizes = sorted({tuple(m.shape[2:]) for m in means})

    # Each distinct list of prompts (the templates, a caption) once; a photo's table row repeats
    # its list's rows so that every photo's prompts are drawn equally often.
    per_photo = [tuple(prompts)] * len(examples) if isinstance(prompts[0], str) else list(map(tuple, prompts))
    first_row, unique = {}, []
    for photo in dict.fromkeys(per_photo):
        first_row[photo] = len(unique)
        unique += photo
    width = math.lcm(*map(len, per_photo))
    prompt_table = torch.tensor(
        [[first_row[photo] + i for i in range(len(photo))] * (width // len(photo)) for photo in per_photo]
    )
    words = placeholders if isinstance(placeholders, list) else [placeholders]
    prompt_ids = [
        tokenize_prompts(unique, tokenizer, {w.token: w.ids[i] for w in words}, sources or {})
        for i, tokenizer in enumerate(models.tokenizers)
    ]

    time_ids = [models.family.time_ids(e["original_size"], e["crop_top_left"], e["target_size"]) for e in examples]
    time_ids = None if time_ids[0] is None else torch.tensor(time_ids, dtype=torch.float32, device=device)
    return TrainingData(
        latent_mean,
        latent_std,
        [ids.to(device) for ids in prompt_ids],
        time_ids,
        unique,
        prompt_table.to(device),
        top_left_padded(weights),
        bucket_sizes,
        [bucket_sizes.index(tuple(m.shape[2:])) for m in means],
        None if concept_of is None else torch.tensor(concept_of, dtype=torch.long, device=device),
    )


def word_occurrences(ids: list[int], word: list[int]) -> tuple[int, bool]:
    """How many times the new word (its N vector tokens, in order) stands in `ids`, and whether
    every vector token in `ids` belongs to one of those (else the word split apart)."""
    starts = [i for i in range(len(ids)) if ids[i : i + len(word)] == word]
    covered = {i + k for i in starts for k in range(len(word))}
    return len(starts), all(i in covered for i, t in enumerate(ids) if t in word)


def tokenize_prompts(prompts: list[str], tokenizer, words: dict[str, list[int]], sources: dict) -> torch.Tensor:
    """[prompts, 77] token ids; each prompt holds a new word (`words`: each placeholder token's
    ids, all its vector tokens in order) once or more, as diffusers' loader expands it at
    inference, and every new word it holds whole. A prompt longer than the tokenizer's limit is
    cut, with a warning naming its file."""
    limit = tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    for prompt, row, full in zip(prompts, tokens, tokenizer(prompts).input_ids):
        source = sources.get(prompt) or f"the prompt {prompt!r}"
        found = {token: word_occurrences(full, ids) for token, ids in words.items()}
        split = [token for token, (_, intact) in found.items() if not intact]
        if split or not any(whole for whole, _ in found.values()):
            raise UserError(
                f"--placeholder_token {(split or list(words))[0]!r} does not tokenize as its own new token(s) in the "
                f"prompt {prompt!r}; use a distinctive lowercase string such as <my-concept>"
            )
        kept = any(word_occurrences(row.tolist(), ids)[0] for ids in words.values())
        if len(full) > limit and not kept:
            raise UserError(
                f"{source}: {len(full)} tokens, more than the tokenizer's {limit}, and the cut removes the new "
                "word; shorten it or put [name] nearer the start"
            )
        if len(full) > limit:
            logger.warning("%s: %d tokens, more than the tokenizer's %d; the rest is cut", source, len(full), limit)
    return tokens


# ----------------------------------------------------------------------------------------
# The new word: N tokens per tokenizer, their rows the only trainable weights.


class PlaceholderEmbedding(nn.Module):
    """A text encoder's token embedding with the placeholder rows read from a separate table.

    The frozen vocabulary is untouched (no 49,408-row gradient or optimizer state exists),
    and the trainable rows stay fp32 whatever precision the encoder runs in. The rows are
    held as a plain attribute, not a registered parameter, so the encoder's `.dtype`,
    `.to()` and `.parameters()` see only its frozen weights.
    """

    def __init__(self, frozen: nn.Embedding, first_id: int, rows: torch.Tensor):
        super().__init__()
        self.frozen = frozen
        self.first_id = first_id
        self.words = [rows]  # each concept's rows, in the order of their ids

    def add(self, first_id: int, rows: torch.Tensor) -> None:
        """Another concept's rows, whose ids follow the last ones'."""
        assert first_id == self.first_id + sum(r.shape[0] for r in self.words), first_id
        self.words.append(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.words[0] if len(self.words) == 1 else torch.cat(self.words)
        n = rows.shape[0]
        is_new = (input_ids >= self.first_id) & (input_ids < self.first_id + n)
        known = self.frozen(input_ids.clamp(max=self.frozen.num_embeddings - 1))
        new = F.embedding((input_ids - self.first_id).clamp(0, n - 1), rows).to(known.dtype)
        return torch.where(is_new.unsqueeze(-1), new, known)


def vocabulary(encoder: nn.Module) -> nn.Embedding:
    """A text encoder's own token embedding, without the new words' rows."""
    embedding = encoder.get_input_embeddings()
    return embedding.frozen if isinstance(embedding, PlaceholderEmbedding) else embedding


@dataclass
class Placeholders:
    tokens: list[str]  # "<cat-toy>", "<cat-toy>_1", ... (diffusers' multi-vector naming)
    ids: list[list[int]]  # per tokenizer
    rows: list[torch.Tensor]  # per text encoder, fp32 [N, D]: the only trainable weights

    @property
    def token(self) -> str:
        return self.tokens[0]


def read_initializer_embedding(args: argparse.Namespace) -> infer.Embedding | None:
    """The embedding --initializer_embedding names, read before any model loads (its vector
    count is the plan's, see make_plan)."""
    if args.initializer_embedding is None:
        return None
    return infer.read_embedding(args.initializer_embedding, flag="--initializer_embedding")


def describe_initializer(phrase: str, pieces: list[str], num_vectors: int) -> str:
    """One line: the tokens an initializer phrase split into, and what each vector starts from."""
    shares = [
        pieces[s.start] if len(s) == 1 else "the mean of " + ", ".join(pieces[s.start : s.stop])
        for s in infer.phrase_shares(len(pieces), num_vectors)
    ]
    starts = (
        f"the vector starts from {shares[0]}"
        if num_vectors == 1
        else "; ".join(f"vector {i + 1} from {share}" for i, share in enumerate(shares))
    )
    return f"--initializer_token {phrase!r} is {infer.plural(len(pieces), 'token')} ({' '.join(pieces)}): {starts}"


def add_placeholder_tokens(models: Models, tokens: list[str], initializer: str | infer.Embedding) -> Placeholders:
    """Add the new word's tokens (infer.vector_tokens) to every tokenizer, and their trainable rows to
    every text encoder, starting from `initializer`: a word or phrase (see phrase_rows) or an
    embedding's own vectors (fitted to the encoders as infer.py loads it)."""
    placeholder, num_vectors = tokens[0], len(tokens)
    slots = models.family.slots
    weights = [vocabulary(encoder).weight for encoder in models.text_encoders]
    if isinstance(initializer, infer.Embedding):
        fitted = infer.fit_to_base(initializer, {slot: w.shape[1] for slot, w in zip(slots, weights)})
        start = [fitted[slot] for slot in slots]
    else:
        start = [
            infer.phrase_rows(weight, tokenizer.encode(initializer, add_special_tokens=False), num_vectors)
            for tokenizer, weight in zip(models.tokenizers, weights)
        ]
        pieces = models.tokenizers[0].tokenize(initializer)
        if len(pieces) > 1:  # one word in several pieces is often a typo: say what it became
            level = logging.WARNING if len(initializer.split()) < len(pieces) else logging.INFO
            logger.log(level, describe_initializer(initializer, pieces, num_vectors))
    all_ids, all_rows = [], []
    for tokenizer, encoder, initial in zip(models.tokenizers, models.text_encoders, start):
        suggestion = f"choose a new string such as <{placeholder.strip('<>')}-concept>"
        pieces = tokenizer.tokenize(placeholder)
        if len(pieces) == 1 and pieces[0] != placeholder and pieces[0] in tokenizer.get_vocab():
            # e.g. "toy" -> "toy</w>": as an added token it would take over the real word everywhere.
            raise UserError(
                f"--placeholder_token {placeholder!r} is already a word the model knows ({pieces[0]}); {suggestion}"
            )
        taken = [t for t in tokens if t in tokenizer.get_vocab()]
        if taken or tokenizer.add_tokens(tokens) != num_vectors:
            raise UserError(
                f"--placeholder_token {placeholder!r}: {(taken or tokens)[0]!r} is already in the tokenizer's "
                f"vocabulary; {suggestion}"
            )
        ids = tokenizer.convert_tokens_to_ids(tokens)
        assert ids == list(range(ids[0], ids[0] + num_vectors)), ids
        rows = initial.to(vocabulary(encoder).weight.device, torch.float32).detach().clone().requires_grad_(True)
        embedding = encoder.get_input_embeddings()
        if isinstance(embedding, PlaceholderEmbedding):  # another concept of the same run
            embedding.add(ids[0], rows)
        else:
            encoder.set_input_embeddings(PlaceholderEmbedding(embedding, ids[0], rows))
        all_ids.append(ids)
        all_rows.append(rows)
    return Placeholders(tokens, all_ids, all_rows)


# ----------------------------------------------------------------------------------------
# Models: what the source is (read from its configs, before any weight), then the weights.
# Everything that differs between SD 1.x/2.x and SDXL is in the model families (infer.py).

MODEL_FLAG = "--pretrained_model_name_or_path"


def read_model_source(args: argparse.Namespace) -> infer.ModelSource:
    """The family and the shapes that flags depend on, from the configs alone (see infer.find_model)."""
    return infer.find_model(args.pretrained_model_name_or_path, args.single_file_config, args.revision, MODEL_FLAG)


@dataclass
class Models:
    family: type[infer.ModelFamily]
    tokenizers: list
    text_encoders: list
    unet: nn.Module
    vae: nn.Module | None
    noise_scheduler: object
    weight_dtype: torch.dtype
    source: infer.ModelSource
    clip_skip: int = 0  # CLIP layers skipped, in diffusers' sense (see the family's condition)
    # What the loss calls: the modules themselves, or their torch.compile'd forms (--compile).
    # Validation images keep the plain modules, so sampling shapes never cause a recompile.
    unet_forward: object = None
    text_encoder_forwards: list | None = None

    def __post_init__(self):
        if self.unet_forward is None:
            self.unet_forward = self.unet
        if self.text_encoder_forwards is None:
            self.text_encoder_forwards = list(self.text_encoders)


def compile_models(models: Models, backend: str) -> None:
    """torch.compile the UNet and text encoder(s) for the training loss. Shapes never change
    during a run (fixed chunks, the validation batch padded to them), so each graph compiles
    once; grad and no-grad (validation) calls make two."""
    torch._dynamo.reset()  # a run compiles its own graphs, whatever ran in this process before
    models.unet_forward = torch.compile(models.unet, backend=backend)
    models.text_encoder_forwards = [torch.compile(e, backend=backend) for e in models.text_encoders]


def load_models(
    args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype, source: infer.ModelSource | None = None
) -> Models:
    """Tokenizer(s), text encoder(s), UNet, VAE and noise scheduler, frozen, on `device`, by
    infer.py's loader (a diffusers folder, a Hub id, or one original-layout file with the
    folder that describes it, --single_file_config). The UNet and text encoders load straight
    into the training precision; the VAE loads in fp32 because it encodes each photo once,
    where fp32 costs nothing and avoids SDXL's fp16 VAE overflow.
    """
    from diffusers import DDPMScheduler

    source = source or read_model_source(args)
    pipe = infer.load_pipeline(
        source,
        {"default": weight_dtype, "vae": torch.float32},
        device,
        prediction_type=args.prediction_type,
        vae=args.pretrained_vae_model_name_or_path,
        variant=args.variant,
        tokenizer=args.tokenizer_name,
    )
    family = source.family
    text_encoders = [getattr(pipe, name) for name in family.encoders]
    for module in (*text_encoders, pipe.unet, pipe.vae):
        module.requires_grad_(False)
        module.eval()
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for encoder in text_encoders:
            encoder.gradient_checkpointing_enable()
            encoder.train()  # transformers checkpoints only in train mode; CLIP has no dropout
    if args.enable_xformers_memory_efficient_attention:
        try:
            pipe.unet.enable_xformers_memory_efficient_attention()
        except Exception as e:
            logger.warning("xformers attention unavailable (%s); using PyTorch's SDPA attention", e)
    tokenizers = [getattr(pipe, name) for name in family.tokenizers]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Models(
        family, tokenizers, text_encoders, pipe.unet, pipe.vae, noise_scheduler, weight_dtype, source, args.clip_skip
    )


# ----------------------------------------------------------------------------------------
# Images: every readable photo in the folder, at --resolution (a square, or its aspect
# bucket), with its prompts (templates or its caption) and, with --masked_loss, its mask.


def crop_box(size: tuple[int, int], target: tuple[int, int], center_crop: bool, fill: bool) -> tuple[int, ...]:
    """The part (left, top, right, bottom) of a w x h photo that is resized to `target` (w, h):
    the whole photo (squashed, as the reference does), its centre square (--center_crop), and
    with `fill` the largest centred part of the target's aspect ratio (cropped only by rounding)."""
    width, height = size
    left, top, right, bottom = 0, 0, width, height
    if center_crop:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        right, bottom = left + side, top + side
    if fill:
        w, h = right - left, bottom - top
        if w * target[1] > h * target[0]:  # wider than the target
            cut = w - round(h * target[0] / target[1])
            left, right = left + cut // 2, right - (cut - cut // 2)
        else:
            cut = h - round(w * target[1] / target[0])
            top, bottom = top + cut // 2, bottom - (cut - cut // 2)
    return left, top, right, bottom


def fit_pixels(
    image: Image.Image, target: tuple[int, int], center_crop: bool, fill: bool = False
) -> tuple[np.ndarray, tuple[int, int]]:
    """The photo (or its mask) at `target` (w, h): uint8 pixels HxW(x3) and the crop's top-left
    corner (y, x) in the resized frame, which SDXL is conditioned on."""
    left, top, right, bottom = crop_box(image.size, target, center_crop, fill)
    resized = image.crop((left, top, right, bottom)).resize(target, Image.Resampling.BICUBIC)
    crop_top_left = (round(top * target[1] / (bottom - top)), round(left * target[0] / (right - left)))
    return np.asarray(resized, dtype=np.uint8), crop_top_left


def bucket_sizes(resolution: int, step: int, smallest: int, largest: int) -> list[tuple[int, int]]:
    """Bucket sizes (w, h): sides multiples of `step` within [smallest, largest], area at most
    resolution², for each width the tallest such height."""
    sizes = []
    for width in range(math.ceil(smallest / step) * step, largest + 1, step):
        height = min(largest, resolution * resolution // width // step * step)
        if height >= max(smallest, step):
            sizes.append((width, height))
    if not sizes:
        raise UserError(
            f"--aspect_buckets: no bucket has sides that are multiples of --bucket_step {step} within "
            f"--min_bucket_resolution {smallest} and --max_bucket_resolution {largest} and an area of at most "
            f"--resolution {resolution} squared"
        )
    return sizes


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the photo's (on a log scale; the larger on a tie)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def read_templates(learnable_property: str) -> list[str]:
    path = HERE / "templates" / f"{learnable_property}.txt"
    if not path.exists():
        raise UserError(f"{path} is missing: keep the templates/ folder (and infer.py) beside textual_inversion.py")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if "{}" in line]


def read_utf8(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # a BOM (Windows editors) is fine
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def read_template_file(path: Path) -> list[str]:
    """An A1111 template file: its lines that contain the new word ([name] or {})."""
    if not path.is_file():
        raise UserError(f"--template_file {path}: no such file")
    lines = [line.strip() for line in read_utf8(path, "--template_file").splitlines()]
    templates = [line for line in lines if "[name]" in line or "{}" in line]
    if not templates:
        raise UserError(f"--template_file {path}: no line contains [name] (or {{}}) where the new word goes")
    return templates


def file_words(path: Path) -> str:
    """A photo's file name as words, as A1111 uses it for [filewords] without a caption."""
    stem = re.sub(r"^[-\d]+\s*", "", path.stem)  # drop numbering such as "00012-"
    return " ".join(re.sub(r"[_\-]+", " ", stem).split())


def fill_template(template: str, word: str, filewords: str) -> str:
    """A template with [name] and {} as the new word and [filewords] as the photo's words, in
    one pass (so a caption's own text is never read as markers). Empty words take their
    separator with them: "a photo of [name], [filewords]" becomes "a photo of <word>"."""
    if not filewords:
        template = re.sub(r"\s*[,;:|]\s*\[filewords\]|\[filewords\]\s*[,;:|]\s*|\s*\[filewords\]", "", template).strip()
    return re.sub(r"\[name\]|\{\}|\[filewords\]", lambda m: filewords if m[0] == "[filewords]" else word, template)


def mark_word(caption: str, token: str, word: str, others: dict[str, str] | None = None) -> tuple[str, int]:
    """The caption with every [name] and every placeholder token as typed replaced by the new
    word (all its vector tokens), and every other concept's token (`others`: token -> word) by
    that concept's word; and how many marks of the new word there were."""
    words = {"[name]": word, token: word, **(others or {})}
    marks = 0

    def put(match: re.Match) -> str:
        nonlocal marks
        marks += words[match[0]] == word
        return words[match[0]]

    return re.sub("|".join(map(re.escape, sorted(words, key=len, reverse=True))), put, caption), marks


def find_mask(photo: Path, mask_dir: Path | None) -> Path | None:
    if mask_dir is None:
        path = photo.with_name(photo.stem + infer.MASK_SUFFIX)
        return path if path.is_file() else None
    found = [
        p for p in sorted(mask_dir.iterdir()) if p.stem == photo.stem and p.suffix.lower() in infer.IMAGE_EXTENSIONS
    ]
    return found[0] if found else None


def open_mask(path: Path, photo_size: tuple[int, int]) -> Image.Image:
    """A mask as greyscale at its photo's size (white: the subject), with one-line errors."""
    try:
        with Image.open(path) as stored:
            stored.load()
            mask = ImageOps.exif_transpose(stored).convert("L")
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"mask {path}: not an image ({e}); replace it with a black-and-white image") from None
    (w, h), (pw, ph) = mask.size, photo_size
    if abs((w / h) / (pw / ph) - 1) > 0.01:
        raise UserError(
            f"mask {path}: {w}x{h} does not have its photo's aspect ratio ({pw}x{ph}); make it the photo's size"
        )
    if mask.getextrema()[1] == 0:
        raise UserError(f"mask {path}: all black, so nothing of the photo would be learned; paint the subject white")
    return mask if mask.size == photo_size else mask.resize(photo_size, Image.Resampling.BILINEAR)


def warn_missing(missing: int, photos: int, what: str) -> None:
    """'N of M photos have no <what>', when some have none."""
    if missing:
        logger.warning(
            "%d of %s %s no %s", missing, infer.plural(photos, "photo"), "has" if missing == 1 else "have", what
        )


class TextualInversionDataset(torch.utils.data.Dataset):
    """The concept's examples: each photo at its training size, as-is and mirrored, plus its
    prompts and mask.

    `dataset[i]` decodes photo i: `pixel_values` [2, 3, h, w] in [-1, 1] (as-is, mirrored),
    `mask` [2, 1, h, w] in [0, 1] or None, `original_size` (h, w), `crop_top_left` (y, x) and
    `target_size` (h, w). `photo_prompts[i]` are the prompts photo i is trained with: its
    caption, or the templates (built-in per --learnable_property, or --template_file) with the
    placeholder string in them. `prompts` are all of them, each once. `data_root` is the
    folder, or its photos as list_photos lists them. `other_words` are the other concepts' words
    that captions may name (token as typed -> all its vector tokens).
    """

    def __init__(
        self,
        data_root: str | Path | list[Path],
        size: int = 512,
        center_crop: bool = False,
        learnable_property: str = "object",
        placeholder_token: str = "*",
        caption_extension: str | None = None,
        template_file: str | Path | None = None,
        masked: bool = False,
        mask_dir: str | Path | None = None,
        buckets: list[tuple[int, int]] | None = None,
        other_words: dict[str, str] | None = None,
    ):
        extension = caption_suffix(caption_extension)
        self.image_paths = data_root if isinstance(data_root, list) else list_photos(data_root, caption_extension)
        self.size = size
        self.center_crop = center_crop
        self.buckets = buckets
        self.templates = (
            read_template_file(Path(template_file)) if template_file else read_templates(learnable_property)
        )
        token = placeholder_token.split(" ", maxsplit=1)[0]  # as typed; the string holds all N vector tokens
        photos = len(self.image_paths)
        self.captions = [self.read_caption(p.with_suffix(extension)) if extension else None for p in self.image_paths]
        filewords = any("[filewords]" in t for t in self.templates)
        self.photo_prompts, self.prompt_sources, prefixed = [], {}, 0
        for path, caption in zip(self.image_paths, self.captions):
            if caption is None:
                words, marks, source = file_words(path), 0, template_file
            else:
                words, marks = mark_word(caption, token, placeholder_token, other_words)
                source = str(path.with_suffix(extension))
            if caption is None or filewords:
                prompts = [fill_template(t, placeholder_token, words) for t in self.templates]
            else:  # the caption is the prompt, with the new word in front where it marks it nowhere
                prompts, prefixed = [words if marks else f"{placeholder_token}, {words}"], prefixed + (not marks)
            self.photo_prompts.append(prompts)
            self.prompt_sources.update((p, source) for p in prompts if source)
        self.prompts = [p for prompts in dict.fromkeys(map(tuple, self.photo_prompts)) for p in prompts]
        if extension:
            warn_missing(
                self.captions.count(None), photos, f"caption ({extension} file) or a blank one; they use the templates"
            )
        if prefixed:
            logger.info(
                "%s had no [name] or %s; the new word was put in front of %s",
                infer.plural(prefixed, "caption"),
                token,
                "it" if prefixed == 1 else "them",
            )
        folder = Path(mask_dir) if masked and mask_dir else None
        if folder is not None and not folder.is_dir():
            raise UserError(f"--mask_dir {folder}: no such folder")
        self.mask_paths = [find_mask(p, folder) if masked else None for p in self.image_paths]
        if masked:
            missing = self.mask_paths.count(None)
            warn_missing(missing, photos, "mask; " + ("it counts fully" if missing == 1 else "they count fully"))

    @staticmethod
    def read_caption(path: Path) -> str | None:
        if not path.is_file():
            return None
        return " ".join(read_utf8(path, "caption").split()) or None

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> dict:
        image = infer.open_rgb(self.image_paths[i])
        left, top, right, bottom = crop_box(image.size, image.size, self.center_crop, fill=False)
        fill = self.buckets is not None
        target = nearest_bucket((right - left, bottom - top), self.buckets) if fill else (self.size, self.size)
        pixels, crop_top_left = fit_pixels(image, target, self.center_crop, fill)
        both = np.stack([pixels, pixels[:, ::-1]])  # the horizontal flip, p=0.5 at training time
        tensor = torch.from_numpy(both.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        mask = None
        if self.mask_paths[i] is not None:
            # Through the same crop and resize as the pixels, and the same flip.
            grey, _ = fit_pixels(open_mask(self.mask_paths[i], image.size), target, self.center_crop, fill)
            mask = torch.from_numpy(np.stack([grey, grey[:, ::-1]]).astype(np.float32) / 255.0)[:, None]
        return {
            "pixel_values": tensor.contiguous(),
            "mask": mask,
            "original_size": (image.height, image.width),
            "crop_top_left": crop_top_left,
            "target_size": (target[1], target[0]),
        }

    def records(self, examples: list[dict]) -> list[dict]:
        """What the trainer sees, one dict per photo (dataset.jsonl)."""
        return [
            {
                "file": str(path),
                "size": list(example["original_size"][::-1]),
                "bucket": list(example["target_size"][::-1]),
                "caption": caption,
                "mask": None if mask is None else str(mask),
                "prompts": list(dict.fromkeys(prompts)),
            }
            for path, example, caption, mask, prompts in zip(
                self.image_paths, examples, self.captions, self.mask_paths, self.photo_prompts
            )
        ]


def list_photos(folder: str | Path, caption_extension: str | None) -> list[Path]:
    """The photos in --train_data_dir: its images, but not masks or caption files."""
    extension = caption_suffix(caption_extension)
    return infer.list_images(Path(folder), (extension.lower(),) if extension else ())


def caption_suffix(caption_extension: str | None) -> str | None:
    return None if caption_extension is None else "." + caption_extension.lstrip(".")


def dataset_from_args(concept: Concept, plan: Plan, photos: list[Path] | None = None) -> TextualInversionDataset:
    args = concept.args
    return TextualInversionDataset(
        args.train_data_dir if photos is None else photos,
        args.resolution,
        args.center_crop,
        args.learnable_property,
        concept.word,
        caption_extension=args.caption_extension,
        template_file=args.template_file,
        masked=args.masked_loss,
        mask_dir=args.mask_dir,
        buckets=plan.buckets,
        other_words={c.tokens[0]: c.word for c in plan.concepts if c is not concept},
    )


def decode_images(dataset: TextualInversionDataset, workers: int) -> list[dict]:
    """Decode every photo once (in threads: Pillow releases the GIL), failing on the first bad one."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(dataset.__getitem__, range(len(dataset))))


# ----------------------------------------------------------------------------------------
# Files: embeddings, the run record, checkpoints, the full pipeline. Every file is written
# atomically, through infer.py.


def save_embeddings(run: Run, concept: Concept, rows: list[torch.Tensor], suffix: str, step: int) -> list[Path]:
    """learned_embeds{suffix} in the family's diffusers layout, recorded in run.json as `step`."""
    folder = run.folder(concept)
    folder.mkdir(parents=True, exist_ok=True)
    files = run.plan.family.embedding_files(rows, concept.tokens[0], run.plan.extension, suffix)
    written = [infer.write_tensors(folder / name, tensors) for name, tensors in files.items()]
    return record_saved(run, concept, written, step)


def save_outputs(run: Run) -> list[Path]:
    """Each concept's files users expect: learned_embeds (the kept step), token_identifier.txt,
    type_of_concept.txt, the family's files for other tools, and learned_embeds-last when early
    stopping kept an earlier step."""
    written = []
    for concept, placeholders, state in zip(run.plan.concepts, run.placeholders, run.state.concepts):
        rows, token, folder = placeholders.rows, concept.tokens[0], run.folder(concept)
        step = state.stopped_at if state.stopped_early else run.state.step  # where its rows stopped changing
        kept = state.kept_rows(rows)
        written += save_embeddings(run, concept, kept, "", state.kept_step(step))
        if kept is not rows:
            written += save_embeddings(run, concept, rows, infer.LAST, step)
        tools = run.plan.family.tool_files(folder, token, kept, run.plan.extension)
        written += record_saved(run, concept, tools, state.kept_step(step))
        written.append(infer.write_text(folder / infer.TOKEN_FILE, token))
        written.append(infer.write_text(folder / "type_of_concept.txt", concept.args.learnable_property))
    return written


def record_saved(run: Run, concept: Concept, files: list[Path], step: int) -> list[Path]:
    run.saved[concept.name].update((file.name, step) for file in files)
    write_run_record(run, concept)
    return files


def write_run_record(run: Run, concept: Concept) -> Path:
    """run.json in the concept's folder: what `infer.py eval` needs to rebuild this run's
    pipeline and the concept's photos, and the step each embedding file in the folder holds."""
    args = concept.args

    def local(name: str | None) -> str | None:  # absolute when it is a local path, else as given (a Hub id)
        return str(Path(name).expanduser().resolve()) if name and Path(name).expanduser().exists() else name

    record = {
        "format": infer.RUN_FORMAT,
        "model": local(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "single_file_config": local(args.single_file_config),
        "vae": local(args.pretrained_vae_model_name_or_path),
        "prediction_type": args.prediction_type,
        "clip_skip": args.clip_skip,
        "resolution": args.resolution,
        "train_data_dir": local(args.train_data_dir),
        "placeholder_token": args.placeholder_token,
        "initializer_token": args.initializer_token,
        "class_word": args.class_word,
        "initializer_embedding": local(args.initializer_embedding),
        "num_vectors": len(concept.tokens),
        "learnable_property": args.learnable_property,
        "family": run.plan.family.name,
        "saved": run.saved[concept.name],
    }
    run.folder(concept).mkdir(parents=True, exist_ok=True)
    return infer.write_text(run.folder(concept) / infer.RUN_RECORD, json.dumps(record, indent=1) + "\n")


def read_saved_steps(out: Path) -> dict[str, int]:
    """The earlier part of a resumed run's record of saved files (none if it cannot be read)."""
    try:
        saved = json.loads((out / infer.RUN_RECORD).read_text(encoding="utf-8"))["saved"]
        return {str(name): int(step) for name, step in saved.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


CHECKPOINT_FORMAT = "textual-inversion-checkpoint/2"  # /1 (one concept, a flat state) still resumes


def save_checkpoint(run: Run) -> Path:
    """checkpoint-N/: every concept's rows, the optimizer, lr schedule and RunState (kilobytes),
    plus the embeddings as they stand, loadable like any output folder (with --concepts_list,
    one folder per concept and concepts.json, as in --output_dir)."""
    state, plan = run.state, run.plan
    payload = {
        "format": CHECKPOINT_FORMAT,
        "family": plan.family.name,  # what a resume checks the model against, with the rows' widths
        "tokens": [c.tokens for c in plan.concepts],
        "rows": [[r.detach().cpu() for r in p.rows] for p in run.placeholders],
        "batch": [run.args.train_batch_size, run.args.gradient_accumulation_steps],
        "state": state.as_dict(),
        **run.optimization.state_dict(),
    }

    def fill(folder: Path) -> None:
        infer.write_torch(folder / CHECKPOINT_STATE, payload)
        if plan.in_folders:
            infer.write_concepts(folder, [concept.name for concept in plan.concepts])
        for concept, placeholders in zip(plan.concepts, run.placeholders):
            (folder / concept.name).mkdir(exist_ok=True)
            files = plan.family.embedding_files(placeholders.rows, concept.tokens[0], plan.extension)
            for name, tensors in files.items():
                infer.write_tensors(folder / concept.name / name, tensors)
            infer.write_text(folder / concept.name / infer.TOKEN_FILE, concept.tokens[0])

    # Complete or absent: `latest` never sees a half-written checkpoint.
    final = infer.atomic_folder(run.out / infer.checkpoint_name(state.step), fill)
    logger.info("Saved checkpoint %s", final)
    if run.args.checkpoints_total_limit is not None:
        for old in list_checkpoints(run.out)[: -run.args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    found = []
    for path in folder.iterdir():
        if (match := infer.CHECKPOINT_NAME.fullmatch(path.name)) and (path / CHECKPOINT_STATE).exists():
            found.append((int(match[1]), path))
    return [p for _, p in sorted(found)]


def find_checkpoint(args: argparse.Namespace) -> Path | None:
    """The folder --resume_from_checkpoint names (None: start fresh), with one-line errors.

    `latest` is the newest checkpoint that reads back whole; newer broken ones are skipped
    with a warning naming them."""
    value = args.resume_from_checkpoint
    if not value:
        return None
    out = Path(args.output_dir)
    if value == "latest":
        for path in reversed(list_checkpoints(out) if out.is_dir() else []):
            try:
                read_checkpoint(path, value)
                return path
            except UserError as e:
                logger.warning("%s", e)
        logger.warning("--resume_from_checkpoint latest: no usable checkpoint in %s; starting from step 0", out)
        return None
    path = Path(value)
    if not path.exists() and (out / value).exists():
        path = out / value  # the reference script resolves names inside --output_dir
    if not path.exists():
        raise UserError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if not (path / CHECKPOINT_STATE).exists():
        raise UserError(
            f"--resume_from_checkpoint {value}: no {CHECKPOINT_STATE} inside, so not a checkpoint of this "
            "trainer (a diffusers-script checkpoint cannot be resumed here; start a new run)"
        )
    read_checkpoint(path, value)
    return path


CHECKPOINT_KEYS = ("tokens", "rows", "batch", "state", "optimizer", "lr_scheduler", "grad_scaler")


def read_checkpoint(path: Path, value: str | None = None) -> dict:
    """A checkpoint's payload, checked whole: it loads, has every part, and finite rows. UserError
    says what is wrong, as --resume_from_checkpoint `value` takes it (`latest` skips it). A stop
    while it reads (Stopped, no Exception) is never taken for a corrupt file."""
    where, then = (f"--resume_from_checkpoint {value}: {path}", "; name another checkpoint, or use latest")
    if value == "latest":
        where, then = f"--resume_from_checkpoint latest: skipping {path}, which", ""
    elif value is None:
        where, then = str(path), ""
    try:
        payload = torch.load(path / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, overwritten, unreadable: all mean the same here
        reason = first_line(e).split(". ")[0]
        raise UserError(f"{where} is corrupt: {CHECKPOINT_STATE} does not load ({reason}){then}") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in payload] if isinstance(payload, dict) else CHECKPOINT_KEYS
    if missing:
        raise UserError(f"{where} is incomplete: {CHECKPOINT_STATE} lacks {', '.join(missing)}{then}")
    if payload.get("format") != CHECKPOINT_FORMAT:  # /1: one concept, its state's fields flat
        state = dict(payload["state"])
        stopped = state.pop("stopped_early", False)
        concept = {k: state.pop(k) for k in list(state) if k not in ("step", "seed")}
        state["concepts"] = [{**concept, "stopped_at": state["step"] if stopped else None}]
        payload.update(tokens=[payload["tokens"]], rows=[payload["rows"]], state=state)
    rows = [r for concept in payload["rows"] for r in concept]
    if not rows or not all(isinstance(r, torch.Tensor) and r.ndim == 2 and r.isfinite().all() for r in rows):
        raise UserError(
            f"{where} is corrupt: the rows in {CHECKPOINT_STATE} are not finite [vectors, width] tensors{then}"
        )
    return payload


def check_resumable(path: Path, payload: dict, models: Models, placeholders: list[Placeholders]) -> None:
    """One line naming what differs between the checkpoint and this run's model and words."""
    family, name = payload.get("family"), models.source.name  # older checkpoints record no family
    where = f"--resume_from_checkpoint {path}"
    if family not in (None, models.family.name) or len(payload["rows"][0]) != len(placeholders[0].rows):
        raise UserError(
            f"{where}: it was trained on a {family or 'different'} model, but {name} is {models.family.name}; "
            "resume with the model it was trained on"
        )
    if len(payload["tokens"]) != len(placeholders):
        raise UserError(
            f"{where}: it trained {infer.plural(len(payload['tokens']), 'concept')}, this run "
            f"{len(placeholders)}; resume with the same --concepts_list"
        )
    for saved, words, saved_rows in zip(payload["tokens"], placeholders, payload["rows"]):
        if len(saved) != len(words.tokens):
            raise UserError(
                f"{where}: {'it' if len(placeholders) == 1 else saved[0]} has {infer.plural(len(saved), 'vector')}, "
                f"--num_vectors is {len(words.tokens)}; "
                f"use --num_vectors {len(saved)}"
            )
        if saved != words.tokens:
            raise UserError(f"{where}: it trained {saved[0]!r}, not {words.token!r}; use the same --placeholder_token")
        for i, (rows, new) in enumerate(zip(saved_rows, words.rows)):
            if rows.shape[1] != new.shape[1]:
                encoder = models.family.encoders[i]
                raise UserError(
                    f"{where}: its {encoder} rows are {rows.shape[1]} wide, but {name}'s are {new.shape[1]} "
                    "(another model); resume with the model it was trained on"
                )


def load_checkpoint(
    path: Path,
    models: Models,
    placeholders: list[Placeholders],
    args: argparse.Namespace,
    optimization: Optimization,
) -> RunState:
    """The checkpoint's rows into the new words, its optimizer state into `optimization`; its RunState."""
    payload = read_checkpoint(path)
    check_resumable(path, payload, models, placeholders)
    if payload["batch"] != [args.train_batch_size, args.gradient_accumulation_steps]:
        logger.warning("Resuming with a different batch size than %s was trained with; the run will differ", path)
    state = RunState.from_dict(payload["state"])
    if args.seed is not None and args.seed != state.seed:
        logger.warning("Resuming with the checkpoint's seed %d, not --seed %d", state.seed, args.seed)
    with torch.no_grad():
        for words, saved in zip(placeholders, payload["rows"]):
            for rows, saved_rows in zip(words.rows, saved):
                rows.copy_(saved_rows)
    for concept, words in zip(state.concepts, placeholders):
        # The best rows are the result only under --early_stopping_patience (resumed without it: the last).
        if concept.best_rows is not None:
            concept.best_rows = [r.to(words.rows[0].device) for r in concept.best_rows]
            if not args.early_stopping_patience:
                concept.best_rows = None
    optimization.load_state_dict(payload)
    return state


def save_full_pipeline(run: Run) -> None:
    """The source pipeline whole, reloaded at its stored precision (a folder: as diffusers
    loads it) with this run's VAE and prediction type, and the new word loaded into it by the
    same loader users call; written beside the embedding files (model_index.json last: a
    loader takes the folder for a pipeline once every part is in place)."""
    from safetensors import SafetensorError

    args, source = run.args, run.models.source
    pipe = infer.load_pipeline(
        source,
        source.file.dtype if source.file else {"default": None, "vae": torch.float32},
        prediction_type=args.prediction_type,
        vae=args.pretrained_vae_model_name_or_path,
        variant=args.variant,
        whole=True,
    )
    infer.load_embedding(pipe, run.out)

    def fill(folder: Path) -> None:
        try:
            pipe.save_pretrained(folder)
        except (SafetensorError, RuntimeError) as e:  # the ways a full disk shows through save_pretrained
            raise OSError(f"the full pipeline ({first_line(e)})") from None

    infer.atomic_folder(run.out, fill, merge=True, last=("model_index.json",))


# ----------------------------------------------------------------------------------------
# The Hub: the embedding files, the plot, the last grid and a model card; no checkpoints.


def hub_api(token: str | None):
    """The Hugging Face Hub client (tests put a recording stand-in here)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def create_hub_repo(args: argparse.Namespace) -> str:
    """Create (or reuse) the repo before training, so a bad token fails in seconds, not at the end."""
    name = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        return hub_api(args.hub_token).create_repo(repo_id=name, private=args.hub_private, exist_ok=True).repo_id
    except Exception as e:  # auth, network, naming: all one line for the user
        raise UserError(f"--push_to_hub: cannot create the Hub repo {name!r} ({first_line(e)})") from None


def model_card(repo_id: str, args: argparse.Namespace, plan: Plan, state: RunState, files: list[str]) -> str:
    """README.md of the Hub repo: what the embedding is for, how it was trained, how to load it;
    with several concepts, each one's folder, word and kept step."""
    concepts, family = plan.concepts, plan.family
    token = " and ".join(c.tokens[0] for c in concepts)
    base = args.pretrained_model_name_or_path
    if infer.is_model_file(base):  # a local file: the card names it; it has no Hub id to link
        base, metadata, pipeline_class = Path(base).name, [], family.pipeline_class
        load_base = f'{pipeline_class}.from_single_file("{base}")'
    else:
        metadata, pipeline_class = [f"base_model: {base}"], "AutoPipelineForText2Image"
        load_base = f'AutoPipelineForText2Image.from_pretrained("{base}")'
    tags = ["textual-inversion", "text-to-image", "diffusers", family.tag]
    settings = {
        "steps": state.step,
        "batch": f"{args.train_batch_size} x {args.gradient_accumulation_steps} accumulation",
        "learning rate": f"{args.learning_rate} ({args.lr_scheduler})",
    }
    loads, kept = [], {}
    for concept, concept_state in zip(concepts, state.concepts):
        load, other_tools = family.card_use(repo_id, concept.tokens[0])
        where = f'"{repo_id}", subfolder="{concept.name}"' if concept.name else f'"{repo_id}"'
        loads.append(load.replace(f'"{repo_id}"', where))  # diffusers loads a concept's folder with subfolder=
        flags, of = concept.args, f" ({concept.tokens[0]})" if concept.name else ""
        settings[f"vectors{of}"] = len(concept.tokens)
        settings[f"initializer{of}"] = flags.initializer_token or f"the embedding {flags.initializer_embedding}"
        kept[f"kept{of}"] = concept_state.kept(state.step, args.early_stopping_patience)
    settings |= {"resolution": args.resolution, "seed": state.seed, **kept}
    clip_skip = args.clip_skip  # images come out best from the layer it was trained on
    if clip_skip:
        settings["clip skip"] = f"{clip_skip} (generate with clip_skip={clip_skip})"
    pipe_clip_skip = f", clip_skip={clip_skip}" if clip_skip else ""
    infer_clip_skip = f" --clip_skip {clip_skip}" if clip_skip else ""
    lines = [
        "---",
        *metadata,
        "library_name: diffusers",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {token}",
        "",
        *(
            [
                f"A Textual Inversion embedding of a{'' if args.learnable_property == 'object' else ' style'} concept "
                f"({args.learnable_property}) for `{base}`. "
                f"Write `{token}` in a prompt to use it."
            ]
            if len(concepts) == 1
            else [
                f"Textual Inversion embeddings of {len(concepts)} concepts for `{base}`, trained together, each in "
                "its own folder. Write their words in a prompt to use them:",
                "",
                *[f"- `{c.tokens[0]}` ({c.args.learnable_property}): `{c.name}/`" for c in concepts],
            ]
        ),
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings.items()],
        "",
        "## Use it",
        "",
        "```python",
        f"from diffusers import {pipeline_class}",
        "",
        f"pipe = {load_base}",
        *loads,
        f'image = pipe("a {token} on the beach"{pipe_clip_skip}).images[0]',
        "```",
        "",
        "With this project's `infer.py`:",
        "",
        "```bash",
        f"python infer.py --model {base} \\",
        f'    --embedding {repo_id} --prompt "a {token} on the beach"{infer_clip_skip}',
        "```",
        "",
        other_tools,
        "",
    ]
    for concept in concepts:
        grid = f"{concept.name}/validation.png" if concept.name else "validation.png"
        if grid in files:
            prompts = "; ".join(concept.args.validation_prompt)
            title = f"## Validation images, {concept.tokens[0]}" if concept.name else "## Validation images"
            lines += [title, "", f"Prompts: {prompts}", "", f"![validation]({grid})", ""]
    if "loss.png" in files:
        lines += ["## Training", "", "![loss](loss.png)", ""]
    return "\n".join(lines)


def prepare_hub_folder(run: Run) -> Path:
    """output_dir/hub/: exactly what is uploaded (the final embedding files, token and concept
    type, loss.png, the last validation grid, README.md). Checkpoints and logs stay local."""
    out, watch, copies = run.out, run.watch, {}
    for concept in run.plan.concepts:  # with --concepts_list, each in its folder, as in --output_dir
        folder, prefix = run.folder(concept), f"{concept.name}/" if concept.name else ""
        names = [
            p.name
            for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in (".safetensors", ".bin") and not infer.is_steps_file(p.name)
        ]
        names += [infer.TOKEN_FILE, "type_of_concept.txt"]
        copies |= {prefix + name: folder / name for name in names}
        if concept.name in watch.last_grids:
            copies[prefix + "validation.png"] = watch.last_grids[concept.name]
    if run.plan.in_folders:
        copies[infer.CONCEPTS_FILE] = out / infer.CONCEPTS_FILE
    if watch.plotted:
        copies["loss.png"] = out / "loss.png"
    card = model_card(run.repo_id, run.args, run.plan, run.state, list(copies))

    def fill(folder: Path) -> None:
        for name, source in copies.items():
            (folder / name).parent.mkdir(exist_ok=True)
            infer.atomic_write(folder / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
        infer.write_text(folder / "README.md", card)

    return infer.atomic_folder(out / "hub", fill)


HUB_RETRY_SECONDS = (10, 30, 90)  # the waits between upload attempts: a network blip or a 5xx passes


def push_to_hub(run: Run, folder: Path) -> None:
    """Upload `folder` (prepare_hub_folder), retrying; a stop during the waits ends them, saying
    how to push later."""
    repo_id = run.repo_id
    later = f"everything is saved in {folder}; push it later with: hf upload {repo_id} {folder}"
    for wait in (*HUB_RETRY_SECONDS, None):
        try:
            hub_api(run.args.hub_token).upload_folder(
                repo_id=repo_id, folder_path=str(folder), commit_message=f"Textual Inversion: {run.state.step} steps"
            )
            break
        except Exception as e:  # no network, a 5xx, an expired token: the files are safe locally
            if wait is None:
                raise UserError(
                    f"--push_to_hub: upload to {repo_id} failed {len(HUB_RETRY_SECONDS) + 1} times ({first_line(e)}); "
                    f"{later}"
                ) from None
            logger.warning("Upload to %s failed (%s); retrying in %g s", repo_id, first_line(e), wait)
            with run.stop.at_once(f"while retrying the Hub upload; {later}"):
                time.sleep(wait)
    logger.info("Pushed to https://huggingface.co/%s", repo_id)


# ----------------------------------------------------------------------------------------
# Stopping cleanly.

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")  # schedulers and `docker stop`, Ctrl-C, a closed terminal


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP as a clean stop, while the `with` block runs.

    Where the run says what a stop would mean (`outcome`: while it prepares, and in `at_once`
    stretches such as validation images) a signal ends that at once with Stopped. Elsewhere (the
    training loop, writing the results) it is only recorded: the loop ends after the current
    step, once all processes agree on it (`agreed`), with a checkpoint.

    A second Ctrl-C ends the process on the spot; every file is written atomically, so nothing is
    left half-written. A SIGTERM or SIGHUP after a stop is the same stop: launchers terminate their
    workers that way after the Ctrl-C or SIGTERM they got too. Signals a shell set to be ignored
    (nohup, background jobs) stay ignored.
    """

    def __init__(self):
        self.received = 0  # the signal that stops the run: received here, or agreed with the others
        # What a stop's last line says when it ends the run at once; None: it waits for the step.
        self.outcome: str | None = "before training started (nothing to save)"
        self.previous: dict[int, object] = {}
        self.group = None  # the CPU process group the processes agree on a stop through

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # the only thread signals reach
            for name in STOP_SIGNALS:
                signum = getattr(signal, name, None)  # Windows has no SIGHUP
                if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if self.received:
            if signum == signal.SIGINT:  # a second Ctrl-C: end now, as the signal itself would
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.received = signum
        if self.outcome is not None:
            raise self.stopped(self.outcome)

    def stopped(self, outcome: str) -> Stopped:
        return Stopped(f"stopped by {signal.Signals(self.received).name} {outcome}", self.received)

    @contextmanager
    def at_once(self, outcome: str):
        """A stretch that a stop ends at once (Stopped, saying `outcome`) instead of after it."""
        before, self.outcome = self.outcome, outcome
        try:
            if self.received:
                raise self.stopped(outcome)
            yield
        finally:
            self.outcome = before

    def agreed(self, world: int) -> int:
        """The signal any process received (0: none), the same on every process, so all stop at
        the same step. One int through a CPU (gloo) all-reduce: no wait for the accelerator."""
        if world == 1:
            return self.received
        if self.group is None:
            self.group = torch.distributed.new_group(backend="gloo")
        flag = torch.tensor([self.received])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        self.received = self.received or int(flag)  # a signal during the all-reduce counts next step
        return int(flag)


# ----------------------------------------------------------------------------------------
# Command line. Every flag of diffusers' textual_inversion.py is accepted with its meaning.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a Textual Inversion embedding for Stable Diffusion 1.x, 2.x or SDXL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="Hub id, diffusers folder, or one original-layout .safetensors/.ckpt file (A1111, ComfyUI).",
    )
    g.add_argument("--revision", help="Model revision (branch, tag or commit) on the Hub.")
    g.add_argument("--variant", help="Weight file variant to load, e.g. fp16.")
    g.add_argument("--tokenizer_name", help="Tokenizer id or path, if not the model's own.")
    infer.add_model_file_flags(g)
    g.add_argument("--pretrained_vae_model_name_or_path", help="A VAE instead of the model's, e.g. SDXL's fp16-fix.")
    g.add_argument("--train_data_dir", help="The photos (3-5 are typical): a folder, or a Hub dataset of them.")
    g.add_argument("--placeholder_token", help='The new word, e.g. "<cat-toy>".')
    g.add_argument(
        "--concepts_list",
        metavar="FILE",
        help=f"Several concepts in one run: a JSON list of objects with their own values of {', '.join(CONCEPT_KEYS)} "
        "over the command line's. Each concept's files go to output_dir/<name>/ (name: the token without <>).",
    )
    g.add_argument(
        "--concept_sampling",
        choices=["proportional", "balanced"],
        default="proportional",
        help="With --concepts_list: each concept's share of a step's samples, by its photos x repeats, or equal.",
    )
    g.add_argument(
        "--initializer_token",
        help="A word or phrase the new word starts from (with several vectors, each from its share of a phrase).",
    )
    g.add_argument(
        "--initializer_embedding",
        metavar="SRC",
        help="Continue an embedding instead (any folder, file or Hub id infer.py reads); sets --num_vectors.",
    )
    g.add_argument(
        "--clip_skip", type=int, default=0, help="CLIP layers to skip, as diffusers' clip_skip (A1111's Clip skip - 1)."
    )
    g.add_argument("--learnable_property", default="object", choices=["object", "style"])
    g.add_argument(
        "--num_vectors", type=int, help="Vectors in the new word. Default: 1, or the initializer embedding's."
    )
    g.add_argument("--repeats", type=int, default=100, help="Passes over the photos per epoch.")
    g.add_argument("--resolution", type=int, default=512, help="Training size in pixels (a multiple of 8).")
    g.add_argument("--center_crop", action="store_true", help="Crop each photo to its centre square first.")
    g.add_argument(
        "--caption_extension",
        help="Caption files beside the photos, e.g. .txt; [name] or the placeholder token marks the new word.",
    )
    g.add_argument(
        "--template_file",
        help="A1111-style prompt templates instead of the built-in ones: [name] (or {}) for the new word, "
        "[filewords] for the caption (or the file name's words).",
    )
    g.add_argument(
        "--masked_loss",
        action="store_true",
        help="Weight the loss by each photo's mask (white: the subject): NAME-masklabel.png, or NAME.* in --mask_dir.",
    )
    g.add_argument("--mask_dir", help="Folder of masks named like the photos (with --masked_loss).")
    g.add_argument("--unmasked_weight", type=float, default=0.1, help="Loss weight of the mask's black part.")
    g.add_argument(
        "--aspect_buckets",
        action="store_true",
        help="Train each photo at the size nearest its aspect ratio (area at most --resolution squared).",
    )
    g.add_argument("--bucket_step", type=int, default=64, help="Bucket sides are multiples of this (pixels).")
    g.add_argument("--min_bucket_resolution", type=int, help="Shortest bucket side. Default: --resolution / 2.")
    g.add_argument("--max_bucket_resolution", type=int, help="Longest bucket side. Default: --resolution x 2.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="Threads decoding photos before training.")

    g = p.add_argument_group("optimization")
    g.add_argument("--seed", type=int, help="Seed for a reproducible run (random if unset).")
    g.add_argument("--train_batch_size", type=int, default=16, help="Samples per micro-batch per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument(
        "--micro_batch_size",
        type=int,
        help="Samples per UNet call (halved on GPU out-of-memory). Default: a whole step's.",
    )
    g.add_argument("--num_train_epochs", type=int, help="Epochs to train (photos x repeats samples each).")
    g.add_argument(
        "--max_train_steps", type=int, help="Optimizer steps. Default: from --num_train_epochs if given, else 5000."
    )
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="Multiply the lr by batch x accumulation x processes.")
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts for cosine_with_restarts.")
    g.add_argument("--use_8bit_adam", action="store_true", help="Accepted; does nothing (Adam's state is kilobytes).")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--gradient_checkpointing", action="store_true", help="Less memory, slower steps.")
    g.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        help="Precision of the frozen models (trained rows stay fp32). Default: accelerate's config, else no.",
    )
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet and text encoders (faster on GPU).")
    g.add_argument("--compile_backend", default="inductor", help="torch.compile backend for --compile.")
    g.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention if installed (PyTorch's SDPA, the default, is as fast).",
    )
    g.add_argument("--local_rank", type=int, default=-1, help="Set by launchers; accelerate handles it.")

    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default="text-inversion-model")
    g.add_argument("--save_steps", type=int, default=500, help="Write learned_embeds-steps-N every N steps.")
    g.add_argument("--save_as_full_pipeline", action="store_true", help="Also save the pipeline with the new word.")
    g.add_argument("--no_safe_serialization", action="store_true", help="Write .bin files instead of .safetensors.")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Write a resumable checkpoint every N steps.")
    g.add_argument(
        "--checkpointing_minutes", type=float, default=10, help="Also one when this many minutes passed (0: off)."
    )
    g.add_argument("--checkpoints_total_limit", type=int, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", help='A checkpoint folder, or "latest" in --output_dir.')
    g.add_argument("--logging_steps", type=int, default=10, help="Read the loss back from the device every N steps.")
    g.add_argument("--report_to", help="tensorboard, wandb, comet_ml, all or none. Default: tensorboard if installed.")
    g.add_argument("--logging_dir", default="logs", help="Tracker folder, inside --output_dir.")

    g = p.add_argument_group("watching the run")
    g.add_argument(
        "--validation_prompt",
        action="append",
        help="Prompt for validation images (repeat for several), with fixed seeds, in output_dir/validation/.",
    )
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="Denoising steps per image.")
    g.add_argument(
        "--validation_steps",
        type=int,
        default=100,
        help="Every N steps: the validation loss (and images, with a prompt).",
    )
    g.add_argument("--validation_epochs", type=int, help="Deprecated: use --validation_steps.")
    g.add_argument(
        "--validation_scores",
        action="store_true",
        help="Score the validation images as `infer.py eval` does: CLIP-I and DINO against the photos, CLIP-T.",
    )
    g.add_argument("--class_word", help="The word CLIP-T reads for the new one. Default: --initializer_token.")
    g.add_argument("--clip_model", default=infer.DEFAULT_CLIP_MODEL, help="CLIP for --validation_scores.")
    g.add_argument("--dino_model", default=infer.DEFAULT_DINO_MODEL, help="DINO for --validation_scores.")
    g.add_argument(
        "--early_stopping_patience",
        type=int,
        help="Stop after K validations without a better loss; keep the best step.",
    )
    g.add_argument(
        "--max_embedding_norm",
        type=float,
        help="After each step, shorten any learned vector longer than this (an inflated norm drowns the prompt).",
    )

    g = p.add_argument_group("the Hugging Face Hub")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the embedding, plots and a card at the end.")
    g.add_argument("--hub_model_id", help="Repo name (default: the output folder's name).")
    g.add_argument("--hub_token", help="Hub token (default: your `hf auth login`); never logged.")
    g.add_argument("--hub_private", action="store_true", help="Create the repo as private.")
    return p


# What a --concepts_list entry may set, with its JSON type: the flags that describe one concept.
CONCEPT_KEYS = {
    "name": str,
    "placeholder_token": str,
    "initializer_token": str,
    "initializer_embedding": str,
    "num_vectors": int,
    "class_word": str,
    "learnable_property": str,
    "train_data_dir": str,
    "caption_extension": str,
    "template_file": str,
    "mask_dir": str,
    "repeats": int,
    "validation_prompt": list,
}


def read_concepts(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """The concepts the run learns, each (its folder's name, its flags): the command line's
    alone (name ""), or each --concepts_list entry over the command line's values."""
    if args.concepts_list is None:
        return [("", args)]
    path = Path(args.concepts_list)
    where = f"--concepts_list {path}"
    if not path.is_file():
        raise UserError(f"{where}: no such file")
    try:
        entries = json.loads(read_utf8(path, "--concepts_list"))
    except ValueError as e:
        raise UserError(f"{where}: not JSON ({e}); fix the file") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise UserError(
            f'{where}: give a JSON list with an object per concept, e.g. [{{"placeholder_token": "<anna>", '
            '"train_data_dir": "anna", "initializer_token": "woman"}]'
        )
    concepts, seen = [], {}
    for number, entry in enumerate(entries, 1):
        at, values = f"{where}, concept {number}", {}
        for key, given in entry.items():
            kind = CONCEPT_KEYS.get(key)
            if kind is None:
                raise UserError(f"{at}: unknown key {key!r}; a concept sets {', '.join(CONCEPT_KEYS)}")
            # One validation prompt as a string, as the flag given once.
            value = [given] if key == "validation_prompt" and isinstance(given, str) else given
            strings = kind is not list or all(isinstance(p, str) for p in value or [])
            if not (value is None or (type(value) is kind and strings)):  # type(): true is no int here
                wanted = "a string or a list of strings" if kind is list else f"a JSON {kind.__name__}"
                raise UserError(f"{at}: {key} must be {wanted}, not {json.dumps(given)}")
            values[key] = value
        name = values.pop("name", None)
        flags = argparse.Namespace(**{**vars(args), **values})
        for key in ("placeholder_token", "train_data_dir"):
            if getattr(flags, key) is None:
                raise UserError(f"{at}: no {key}; give it in the entry (or --{key} for every concept)")
        if flags.learnable_property not in ("object", "style"):
            raise UserError(f"{at}: learnable_property must be object or style, not {flags.learnable_property!r}")
        if problem := concept_problem(flags):
            raise UserError(f"{at}: {problem}")
        name = name or infer.file_name_for_token(flags.placeholder_token)
        if (
            name != infer.file_name_for_token(name)
            or name in ("hub", args.logging_dir)
            or name.startswith("checkpoint-")
        ):
            raise UserError(f"{at}: {name!r} cannot name a folder in --output_dir; give a plain name, such as anna")
        for key, value in (("placeholder_token", flags.placeholder_token), ("name", name)):
            if (key, value) in seen:
                raise UserError(f"{at}: {key} {value!r} is concept {seen[key, value]}'s too; give each concept its own")
            seen[key, value] = number
        concepts.append((name, flags))
    return concepts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked on their own (what needs the model or the photos is checked by make_plan).
    The result is never written to afterwards: derived values live in the Plan."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concepts_list is None:  # else each concept's entry is checked when read (read_concepts)
        missing = [f"--{k}" for k in ("train_data_dir", "placeholder_token") if getattr(args, k) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
        if problem := concept_problem(args):
            raise UserError(problem)
    checks = [
        (args.clip_skip >= 0, f"--clip_skip must be at least 0 (got {args.clip_skip})"),
        (args.train_batch_size >= 1, "--train_batch_size must be at least 1"),
        (args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (args.max_train_steps is None or args.max_train_steps >= 1, "--max_train_steps must be at least 1"),
        (args.num_train_epochs is None or args.num_train_epochs >= 1, "--num_train_epochs must be at least 1"),
        (args.save_steps >= 1 and args.checkpointing_steps >= 1, "--save_steps and --checkpointing_steps must be >= 1"),
        (args.checkpointing_minutes >= 0, "--checkpointing_minutes must be 0 (off) or more"),
        (args.logging_steps >= 1, "--logging_steps must be at least 1"),
        (args.validation_steps >= 1, "--validation_steps must be at least 1"),
        (args.num_validation_images >= 1, "--num_validation_images must be at least 1"),
        (args.validation_inference_steps >= 1, "--validation_inference_steps must be at least 1"),
        (
            args.early_stopping_patience is None or args.early_stopping_patience >= 1,
            "--early_stopping_patience must be >= 1",
        ),
        (args.max_embedding_norm is None or args.max_embedding_norm > 0, "--max_embedding_norm must be positive"),
        (0 <= args.unmasked_weight <= 1, f"--unmasked_weight must be between 0 and 1 (got {args.unmasked_weight})"),
        (args.micro_batch_size is None or args.micro_batch_size >= 1, "--micro_batch_size must be at least 1"),
        (
            args.checkpoints_total_limit is None or args.checkpoints_total_limit >= 1,
            "--checkpoints_total_limit must be >= 1",
        ),
        (args.bucket_step >= 1, f"--bucket_step must be at least 1 (got {args.bucket_step})"),
        (
            not Path(args.output_dir).exists() or Path(args.output_dir).is_dir(),
            f"--output_dir {args.output_dir} is a file; give a folder path",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    infer.check_pixels("--resolution", args.resolution)
    if args.validation_epochs is not None:
        logger.warning("--validation_epochs is deprecated; use --validation_steps")
    if args.use_8bit_adam:
        logger.warning(
            "--use_8bit_adam does nothing here: Adam keeps state for the new word's rows only (kilobytes), "
            "so 8 bits would save nothing"
        )
    return args


def concept_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags that describe one concept (the command line's, or a
    --concepts_list entry over them), in one line; None if nothing."""
    checks = [
        (
            (args.initializer_token is None) != (args.initializer_embedding is None),
            "give --initializer_token (a word or phrase to start from) or --initializer_embedding "
            "(an embedding to continue), one of the two",
        ),
        (
            args.initializer_token is None or args.initializer_token.strip() != "",
            "--initializer_token is empty; give a word or phrase the new word starts from",
        ),
        (
            args.num_vectors is None or args.num_vectors >= 1,
            f"--num_vectors must be at least 1 (got {args.num_vectors})",
        ),
        (
            not args.validation_scores or bool(args.validation_prompt),
            "--validation_scores scores the validation images: give --validation_prompt too",
        ),
        (
            not args.validation_scores or bool(args.class_word or args.initializer_token),
            "--validation_scores with --initializer_embedding needs --class_word: the word CLIP-T reads in place "
            "of the new one (e.g. toy, dog)",
        ),
        (args.placeholder_token.strip() != "", "--placeholder_token must not be empty"),
        (
            len(args.placeholder_token.split()) <= 1 and args.placeholder_token == args.placeholder_token.strip(),
            f"--placeholder_token {args.placeholder_token!r} holds whitespace; a prompt word is one string without "
            "spaces, such as <my-concept>",
        ),
        (
            args.caption_extension is None or bool(args.caption_extension.strip(". ")),
            f"--caption_extension {args.caption_extension!r}: give an extension such as .txt",
        ),
        (args.repeats >= 1, "--repeats must be at least 1"),
        (not args.mask_dir or args.masked_loss, "--mask_dir needs --masked_loss"),
    ]
    return next((message for ok, message in checks if not ok), None)


if __name__ == "__main__":
    sys.exit(main())
