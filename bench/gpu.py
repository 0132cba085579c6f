"""The GPU figures in one call of about six minutes: this trainer against diffusers' scripts.

    python bench/gpu.py --reference REF/textual_inversion.py --reference_sdxl REF/textual_inversion_sdxl.py
    python bench/gpu.py --smoke     # the same plan at the tiny shapes on a CPU, in a minute or two

On one H100/H200 it runs these rows in priority order and rewrites gpu.json and gpu.md (a section
for bench/RESULTS.md) in --out after every run:
  sd15     SD 1.5 shapes at 512 px, bf16, the cat-toy recipe (1 x 4 accumulated samples, lr 5e-4
           scaled, constant, seed 0): this trainer against textual_inversion.py (--reference)
  floor    a bare text encoder + UNet forward and backward at the same shapes (bench/floor.py)
  memory   peak allocated memory with --gradient_checkpointing, both trainers (without: from sd15)
  sdxl     SDXL shapes at 1024 px against textual_inversion_sdxl.py (--reference_sdxl), and its floor
  scoring  `infer.py eval` on the sd15 row's run, 2 DreamBench prompts x 2 images a step, with
           random-weight scorers of the default scorers' shapes (CLIP ViT-B/32, DINO ViT-S/16):
           seconds per scored step and images/s, generating the images (first eval) and reusing
           them all (rerun: scoring only)
  compile  --compile, cold (compile caches off), against the plain run
  concepts K = 4 concepts in one run (--concepts_list) against 4 one-concept runs, at the sd15 row's
           shapes and recipe, the joint run 4x the steps (the same samples in all): start-up paid
           once against 4 times, and per sample between loss read-backs
--budget_s (default 360) bounds the whole call, model building included. Each row gets a share of
what is left; step counts are calibrated from each trainer's first (short) run to fit that share;
at the deadline the run in progress is stopped and the plan ends with the rows it has, exit 0.

How each figure is taken:
  - per sample: the wall-clock difference of a short and a long run of the same trainer, each
    timed from its first optimizer step to a torch.cuda.synchronize() at its exit (bench/probe.py),
    over the extra samples, so start-up and its variation cancel. Not per-step timestamps: this
    trainer syncs only when it logs, the reference every step.
  - start-up: launch to the first optimizer step.
  - the recipe's 3,000 steps (12,000 samples): for this trainer measured whole when that run fits
    its share (the long run is then the recipe itself), else start-up + 12,000 x per sample,
    labelled projected; always projected for the reference.
  - peak allocated: torch.cuda.max_memory_allocated() of the run.
  - --compile: one cold run; its steady cost comes from the loss read-backs it logs every 10 steps
    (each one a host sync), set against the same figure of the plain long run; the compile time
    is its extra start-up.
  - scoring: as bench/eval_cost.py, `infer.py eval` of a run that saved more than one step (the
    sd15 long run, with the short run's rows as its learned_embeds-steps-N: entries step 0, N
    and the final step), first generating every image, then again reusing them all (loading and
    scoring only). Each eval marks the end of every scored entry in its own process (its scores
    read back, so synchronized); per scored step = (time after the last entry - time after the
    first) / (entries - 1): eval_cost's difference of more scored steps against fewer, taken
    within one process, so start-up, loading and the photos' features cancel without a second
    eval. Images per second: the images scored in that span over it.
Models are random-weight models of the real shapes (bench/models.py), built on the GPU by this
process. The trainers are its subprocesses, interleaved (ours short, reference short, ours long,
reference long), with the same photos, recipe, precision and seed.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from launch, imports included
START_EPOCH = time.time()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import infer  # noqa: E402
from bench.bench import commit, machine, recipe, reference_copy  # noqa: E402
from bench.models import CACHE  # noqa: E402

VOCAB = CACHE / "bpe_simple_vocab_16e6.txt.gz"
TRAVEL_COMMIT = ROOT / ".whl" / "commit.txt"  # written by bench/gpu_wheels.sh: the copy there may have no .git
BATCH, ACCUMULATION = 1, 4  # the cat-toy recipe of diffusers' docs
SAMPLES_PER_STEP = BATCH * ACCUMULATION


# ----------------------------------------------------------------------------------------
# Settings: the GPU plan, and the same plan at the tiny shapes for a CPU.


@dataclass(frozen=True)
class Steps:
    """Optimizer steps for one trainer at one shape: the short (calibration) run, and the
    bounds of the long run."""

    short: int
    min_long: int
    max_long: int


@dataclass(frozen=True)
class Shape:
    name: str  # a bench/models.py shape
    resolution: int
    ours: Steps
    reference: Steps

    def steps(self, trainer: str) -> Steps:
        return self.ours if trainer == "ours" else self.reference


@dataclass(frozen=True)
class Settings:
    sd: Shape
    xl: Shape
    precision: str
    recipe_steps: int  # the recipe whose wall time is measured or projected
    logging_steps: int  # this trainer's loss read-back interval (each one a host sync)
    compile_backend: str
    compile_steps: tuple[int, int]  # bounds of the --compile run
    compile_steady_s: float  # training time the --compile run aims for after its compile
    grace_s: float  # a stopped run gets this long to exit before it is killed
    photo_size: int  # side of the synthetic photos, when no real ones are found
    model_dtype: str  # the precision the random-weight models are built and stored in
    scorers: str  # bench/models.py scorer shapes: real (CLIP ViT-B/32, DINO ViT-S/16) or tiny
    eval_prompts: int  # the scoring row's prompts: the first N of DreamBench's object prompts
    eval_images: int  # its --num_images_per_prompt
    eval_inference_steps: int  # its --num_inference_steps
    concepts_steps: int  # --max_train_steps of every run of the concepts row, joint and separate


GPU = Settings(
    sd=Shape("sd15", 512, ours=Steps(20, 200, 3000), reference=Steps(5, 25, 3000)),
    xl=Shape("sdxl", 1024, ours=Steps(5, 20, 3000), reference=Steps(2, 8, 3000)),
    precision="bf16",
    recipe_steps=3000,
    logging_steps=10,
    compile_backend="inductor",
    compile_steps=(100, 3000),
    compile_steady_s=15.0,
    grace_s=8.0,
    photo_size=1440,  # the DreamBooth photos' size
    model_dtype="fp16",
    scorers="real",
    eval_prompts=2,  # 4 images an entry, 12 for the 3 entries: about the row's share of the budget
    eval_images=2,
    eval_inference_steps=30,  # infer.py eval's default
    concepts_steps=100,  # 10 loss read-backs; 400 samples, about 2 s at 200 samples/s: start-up dominates
)
SMOKE = Settings(
    sd=Shape("tiny", 64, ours=Steps(2, 4, 6), reference=Steps(1, 2, 3)),
    xl=Shape("tiny-xl", 64, ours=Steps(2, 3, 4), reference=Steps(1, 2, 3)),
    precision="no",
    recipe_steps=6,  # short enough that the smoke run measures it whole at the SD shape
    logging_steps=1,
    compile_backend="eager",
    compile_steps=(3, 4),
    compile_steady_s=1.0,
    grace_s=3.0,
    photo_size=96,
    model_dtype="fp32",
    scorers="tiny",
    eval_prompts=2,
    eval_images=2,
    eval_inference_steps=4,
    concepts_steps=3,
)


# ----------------------------------------------------------------------------------------
# Stopping at the budget.


class BudgetSpent(Exception):
    """The budget ran out during (or before) a run: the plan ends with what it has."""


class RowSkipped(Exception):
    """A row that cannot run here (its input or command is missing); the plan goes on."""


class RunFailed(Exception):
    """A trainer exited with an error; the row is recorded as failed and the plan goes on."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


def group_kwargs() -> dict:
    """Start a child in its own process group (to stop it with every worker it spawned, such as
    inductor's compile workers) but in this session, so that whoever stops this process's session
    stops the child too."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}  # pragma: no cover - Python 3.10


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the child's group (this trainer then checkpoints and exits), SIGKILL after grace_s."""
    for signum, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.communicate(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_until(command: list[str], env: dict, deadline: float, grace_s: float) -> tuple[int | None, str, float]:
    """Run `command` until it exits or `deadline` (time.monotonic()) passes, whichever is first.

    Returns (exit status, or None when the deadline stopped it; its output; seconds it ran)."""
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        **group_kwargs(),
    )
    try:
        output, _ = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
        return process.returncode, output, time.monotonic() - started
    except subprocess.TimeoutExpired:
        stop_group(process, grace_s)
        return None, "", time.monotonic() - started
    finally:
        if process.poll() is None:  # interrupted: leave nothing running on the GPU
            stop_group(process, grace_s)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


# ----------------------------------------------------------------------------------------
# Step counts: calibrated from the short run.


@dataclass(frozen=True)
class Calibration:
    """A run's cost as start-up + per step x (steps - 1) + tail, from its short run."""

    startup_s: float  # launch to the first optimizer step
    per_step_s: float
    tail_s: float  # last optimizer step to the synchronized exit (final validation, saving)
    margin: float = 1.1

    @classmethod
    def from_run(cls, run: dict) -> Calibration:
        startup = run["startup_s"]
        per_step = run["per_step_s"] or max(run["synced_end_s"] - startup, 1e-3)
        if run["in_run_ms_per_sample"]:  # synced read-backs: the honest rate where there are two
            per_step = max(per_step, run["in_run_ms_per_sample"] * SAMPLES_PER_STEP / 1000)
        return cls(startup, per_step, max(run["synced_end_s"] - run["last_step_s"], 0.0))

    def seconds(self, steps: int) -> float:
        return self.margin * (self.startup_s + (steps - 1) * self.per_step_s + self.tail_s)

    def steps_within(self, seconds: float) -> int:
        return 1 + math.floor((seconds / self.margin - self.startup_s - self.tail_s) / self.per_step_s)


def long_steps(
    calibration: Calibration, bounds: Steps, recipe_steps: int, allowance: float, recipe_allowance: float, limit: float
) -> int:
    """Steps for the long run: the whole recipe when it is estimated to fit `recipe_allowance`,
    else as many as fit `allowance`, within `bounds`, and never more than fit `limit` (the time
    left before the deadline). BudgetSpent when not even bounds.min_long fits `limit`."""
    if recipe_steps <= bounds.max_long and calibration.seconds(recipe_steps) <= min(recipe_allowance, limit):
        return recipe_steps
    steps = max(bounds.min_long, min(calibration.steps_within(allowance), bounds.max_long, recipe_steps))
    if calibration.seconds(steps) > limit:
        steps = max(bounds.min_long, calibration.steps_within(limit))
        if calibration.seconds(steps) > limit:
            raise BudgetSpent(
                f"the long run needs about {calibration.seconds(steps):.0f} s for {steps} steps; {limit:.0f} s left"
            )
    return steps


# ----------------------------------------------------------------------------------------
# Runs.


def slope(times: list[float]) -> float | None:
    """Seconds per step over the last three quarters of a run's optimizer-step times."""
    first = max(1, len(times) // 4)
    if len(times) - first < 1:
        return None
    return (times[-1] - times[first - 1]) / (len(times) - first)


def in_run_ms_per_sample(logs: list[dict], last_step: int) -> float | None:
    """ms per sample between the first and last loss read-backs (each a host sync). The final
    one, which also waits for the last validation, is left out when there are enough others."""
    points = [(entry["step"], entry["time"]) for entry in logs if "loss" in entry and entry.get("step")]
    if len(points) >= 3 and points[-1][0] == last_step:
        points = points[:-1]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    (first_step, first_time), (last, last_time) = points[0], points[-1]
    return 1000 * (last_time - first_time) / ((last - first_step) * SAMPLES_PER_STEP)


def run_figures(record: dict, launched_epoch: float, wall_s: float) -> dict:
    """What one run measured, with times from its launch (the parent's clock)."""
    offset = record["start_epoch"] - launched_epoch
    steps = record["steps"]
    return {
        "steps": len(steps),
        "wall_s": wall_s,
        "startup_s": offset + steps[0] if steps else None,
        "last_step_s": offset + steps[-1] if steps else None,
        "synced_end_s": offset + record["end"],
        "per_step_s": slope(steps),
        "in_run_ms_per_sample": in_run_ms_per_sample(record["logs"], len(steps)),
        "peak_allocated_bytes": record["cuda_peak_allocated_bytes"],
        "peak_rss_bytes": record["peak_rss_bytes"],
    }


def trainer_figures(short: dict, long: dict, recipe_steps: int, whole: bool) -> dict:
    """Per sample from the difference of the two runs; the recipe measured (`whole`: the long
    run was the recipe) or projected.

    Each run is timed from its first optimizer step to its synchronized exit, so what the
    difference holds is the extra steps alone: start-up (imports, loading, the VAE pass) and its
    run-to-run variation drop out, and the first step and the tail (final validation, saving)
    are in both runs. `per_sample_from_launch_ms` differences from the launch instead."""
    extra = (long["steps"] - short["steps"]) * SAMPLES_PER_STEP
    trained = [run["synced_end_s"] - run["startup_s"] for run in (short, long)]
    per_sample = (trained[1] - trained[0]) / extra
    from_launch = (long["synced_end_s"] - short["synced_end_s"]) / extra
    if per_sample <= 0:  # start-up varied more than the extra steps cost: too few steps to tell
        per_sample = None
    startup = statistics.fmean([short["startup_s"], long["startup_s"]])
    if whole:
        recipe_wall, kind = long["wall_s"], "measured"
    else:
        recipe_wall = None if per_sample is None else startup + recipe_steps * SAMPLES_PER_STEP * per_sample
        kind = "projected"
    peaks = [r["peak_allocated_bytes"] for r in (short, long) if r["peak_allocated_bytes"] is not None]
    return {
        "per_sample_ms": None if per_sample is None else 1000 * per_sample,
        "per_sample_from_launch_ms": 1000 * from_launch,
        "samples_per_s": None if per_sample is None else 1 / per_sample,
        "startup_s": startup,
        "recipe_steps": recipe_steps,
        "recipe_wall_s": recipe_wall,
        "recipe_wall": kind,
        "peak_allocated_bytes": max(peaks) if peaks else None,
        "peak_rss_bytes": max(short["peak_rss_bytes"], long["peak_rss_bytes"]),
        "in_run_ms_per_sample": long["in_run_ms_per_sample"],
    }


class Bench:
    """The plan's state: the deadline, the models built, the photos, the report."""

    def __init__(self, args: argparse.Namespace, settings: Settings, work: Path, report: dict):
        import torch

        self.args, self.settings, self.work, self.report = args, settings, work, report
        self.deadline = START + args.budget_s
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.models: dict[str, Path] = {}
        self.build_s: dict[str, float] = {}
        self.photos = find_photos(args, settings, work)
        self.references: dict[str, Path] = {}
        self.outputs: dict[str, Path] = {}  # label: the --output_dir of a run kept for a later row

    def log_run(self, label: str, launched_epoch: float, wall: float, cpu: float, status: int | None) -> None:
        launched = launched_epoch - START_EPOCH
        self.report["runs"].append(
            {"label": label, "launched_s": launched, "seconds": wall, "cpu_s": cpu, "status": status}
        )

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - START:5.0f} s] {message}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.report["elapsed_s"] = time.monotonic() - START
        out = Path(self.args.out)
        infer.write_text(out / "gpu.json", json.dumps(self.report, indent=1) + "\n")
        infer.write_text(out / "gpu.md", markdown(self.report))

    def model(self, shape: str) -> Path:
        """The random-weight pipeline of `shape`, built once, on the device (no CPU copy)."""
        if shape not in self.models:
            import torch

            from bench.models import build_pipeline

            if self.left() < 0:
                raise BudgetSpent(f"no time left to build the {shape} model")
            folder = self.work / "models" / shape
            self.say(f"building the random-weight {shape} model on {self.device.type}")
            started = time.monotonic()
            dtype = {"fp16": torch.float16, "fp32": torch.float32}[self.settings.model_dtype]
            with self.device:
                build_pipeline(shape, folder, dtype=dtype)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.models[shape], self.build_s[shape] = folder, time.monotonic() - started
        return self.models[shape]

    def reference(self, path: str) -> Path:
        """The reference as given where torchvision is installed; elsewhere a copy that imports
        the PIL stand-in (bench/shims), as bench.py runs it."""
        if importlib.util.find_spec("torchvision") is not None:
            return Path(path)
        if path not in self.references:
            folder = self.work / f"reference-{len(self.references)}"
            folder.mkdir(parents=True)
            self.references[path] = reference_copy(Path(path), folder)
        return self.references[path]

    def env(self, trainer: str, extra: dict | None = None) -> dict:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if trainer == "ours" and importlib.util.find_spec("matplotlib") is not None:
            env.update(MPLBACKEND="Agg", PROBE_IMPORTS="matplotlib.pyplot")  # see bench/probe.py
        if self.args.smoke:  # tiny tensors: a second thread only contends (twice the CPU time on a busy machine)
            env.setdefault("OMP_NUM_THREADS", "1")
        if trainer == "reference" and importlib.util.find_spec("torchvision") is None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "shims"), env.get("PYTHONPATH")]))
        return {**env, **(extra or {})}

    def spawn(self, label: str, command: list[str], env: dict) -> tuple[int | None, str, float, float]:
        """Run one subprocess until it exits or the deadline stops it, and log it: (its status, None
        when stopped; its output; seconds it ran; launch time on the wall clock)."""
        limit = self.deadline - self.settings.grace_s
        if limit - time.monotonic() < 1:
            raise BudgetSpent(f"{label}: no time left to start it")
        launched_epoch, cpu = time.time(), children_cpu_s()
        status, output, wall = run_until(command, env, limit, self.settings.grace_s)
        self.log_run(label, launched_epoch, wall, children_cpu_s() - cpu, status)
        return status, output, wall, launched_epoch

    def launch(self, label: str, command: list[str], env: dict, record: Path) -> tuple[dict, float, float]:
        """Run one subprocess to completion or to the deadline: (its probe record, launch time on
        the wall clock, seconds it ran). BudgetSpent or RunFailed otherwise."""
        status, output, wall, launched_epoch = self.spawn(label, command, env)
        if status is None:
            partial = ""
            if record.exists():  # this trainer exits through its stop handler, and the probe writes on exit
                steps = json.loads(record.read_text())["steps"]
                partial = f" ({len(steps)} optimizer steps done, " + (
                    f"the first {record_offset(record, launched_epoch) + steps[0]:.0f} s after launch)"
                    if steps
                    else "none yet)"
                )
            raise BudgetSpent(f"{label}: stopped at the budget after {wall:.0f} s{partial}")
        if status != 0 or not record.exists():
            raise RunFailed(f"{label} exited with status {status}", tail(output))
        return json.loads(record.read_text()), launched_epoch, wall

    def train(
        self,
        trainer: str,
        shape: Shape,
        model: Path,
        steps: int,
        label: str,
        flags: tuple = (),
        env: dict | None = None,
        keep: bool = False,
    ) -> dict:
        """One run of this trainer or the reference under bench/probe.py: its figures. `keep`:
        its --output_dir stays (in self.outputs, by label) for a later row; else it is removed."""
        script = ROOT / "textual_inversion.py" if trainer == "ours" else self.reference(self.reference_path(shape))
        out = self.work / label
        flags_for = SimpleNamespace(
            data=self.photos,
            resolution=shape.resolution,
            train_batch_size=BATCH,
            gradient_accumulation_steps=ACCUMULATION,
            both_flags="",
        )
        argv = recipe(flags_for, model, out, steps, self.settings.precision)
        if trainer == "ours":
            argv += ["--logging_steps", str(self.settings.logging_steps)]
        record = self.work / f"{label}.json"
        command = [sys.executable, str(HERE / "probe.py"), str(record), str(script), *argv, *flags]
        self.say(f"{label}: {steps} steps")
        data, launched_epoch, wall = self.launch(label, command, self.env(trainer, env), record)
        figures = run_figures(data, launched_epoch, wall)
        if figures["steps"] != steps:
            raise RunFailed(f"{label}: {figures['steps']} optimizer steps recorded, {steps} asked")
        if keep:
            self.outputs[label] = out
        else:
            shutil.rmtree(out, ignore_errors=True)
        return figures

    def call(self, label: str, command: list[str], env: dict, record: Path) -> tuple[dict, float]:
        """Run a subprocess that writes `record` (JSON) to completion or to the deadline: (the
        record, seconds it ran). BudgetSpent or RunFailed otherwise."""
        status, output, wall, _ = self.spawn(label, command, env)
        if status is None:
            raise BudgetSpent(f"{label}: stopped at the budget after {wall:.0f} s")
        if status != 0 or not record.exists():
            raise RunFailed(f"{label} exited with status {status}", tail(output))
        return json.loads(record.read_text()), wall

    def reference_path(self, shape: Shape) -> str:
        return self.args.reference_sdxl if shape is self.settings.xl else self.args.reference


def record_offset(record: Path, launched_epoch: float) -> float:
    return json.loads(record.read_text())["start_epoch"] - launched_epoch


# ----------------------------------------------------------------------------------------
# Photos.


def synthetic_photo(size: int, seed: int):
    """A smooth picture (gradients and a blob): latents that are not degenerate, a JPEG that
    decodes like a photo of its size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [0.5 + 0.5 * np.sin(3 * (a * x + b * y) + c) for a, b, c in rng.uniform(-1, 1, (3, 3))]
    blob = np.exp(-(((x - rng.uniform(0.3, 0.7)) ** 2 + (y - rng.uniform(0.3, 0.7)) ** 2) / 0.03))
    noise = rng.normal(0, 0.03, (size, size, 1))
    pixels = np.clip((np.stack(channels, -1) * (1 - 0.8 * blob[..., None]) + noise) * 255, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def find_photos(args: argparse.Namespace, settings: Settings, work: Path) -> Path:
    """--data; else the DreamBooth duck_toy photos (copied into bench/.cache/photos by
    gpu_wheels.sh, or beside the checkout); else four synthetic ones. The smoke run always
    writes small synthetic ones unless --data is given."""
    if args.data:
        return Path(args.data)
    if not args.smoke:
        for folder in (CACHE / "photos" / "duck_toy", ROOT.parent / "shared" / "data" / "dreambooth" / "duck_toy"):
            if folder.is_dir() and any(folder.iterdir()):
                return folder
    folder = work / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        photo = synthetic_photo(settings.photo_size, i)
        infer.atomic_write(folder / f"{i:02d}.jpg", lambda tmp, photo=photo: photo.save(tmp, format="JPEG", quality=90))
    return folder


# ----------------------------------------------------------------------------------------
# The rows, in priority order. Each fills its entry of gpu.json as it goes (so a stopped row
# keeps what it measured) and raises BudgetSpent, RowSkipped or RunFailed to end early.


def compare(bench: Bench, entry: dict, shape: Shape, reference: str | None, allowance: float) -> None:
    """This trainer against the reference at one shape: short runs (which calibrate), then long
    runs sized to the row's share, interleaved."""
    began = time.monotonic()
    settings = bench.settings
    model = bench.model(shape.name)
    entry.update(
        shape=shape.name,
        resolution=shape.resolution,
        precision=settings.precision,
        samples_per_step=SAMPLES_PER_STEP,
        recipe_steps=settings.recipe_steps,
        build_s=bench.build_s[shape.name],
        reference_script=reference,
    )
    trainers = ["ours", "reference"] if reference else ["ours"]
    entry.update(ours=None, reference=None, speedup=None)  # filled below, in this order

    def kept(trainer: str) -> bool:  # this trainer's SD runs are what the scoring row evaluates
        return trainer == "ours" and shape is settings.sd

    runs: dict[str, dict] = entry.setdefault("runs", {})
    for trainer in trainers:
        runs[trainer] = {}
        runs[trainer]["short"] = bench.train(
            trainer, shape, model, shape.steps(trainer).short, f"{shape.name}-{trainer}-short", keep=kept(trainer)
        )
        bench.save()
    for index, trainer in enumerate(trainers):
        left_in_row = allowance - (time.monotonic() - began)
        calibration = Calibration.from_run(runs[trainer]["short"])
        # Ours takes 60% of what is left (75% to measure the whole recipe); the reference the rest.
        last = index == len(trainers) - 1
        share, recipe_share = (1.0, 1.0) if last else (0.6, 0.75)
        limit = bench.left() - settings.grace_s - 2
        recipe_allowance = left_in_row * recipe_share if trainer == "ours" else -1.0
        steps = long_steps(
            calibration, shape.steps(trainer), settings.recipe_steps, left_in_row * share, recipe_allowance, limit
        )
        label = f"{shape.name}-{trainer}-long"
        runs[trainer]["long"] = bench.train(trainer, shape, model, steps, label, keep=kept(trainer))
        whole = trainer == "ours" and steps == settings.recipe_steps
        entry[trainer] = trainer_figures(runs[trainer]["short"], runs[trainer]["long"], settings.recipe_steps, whole)
        bench.save()
    if reference:
        ours, ref = entry["ours"], entry["reference"]
        entry["speedup"] = {
            key: ref[key] / ours[key] if ref[key] and ours[key] else None for key in ("per_sample_ms", "recipe_wall_s")
        }


def floor(bench: Bench, shape: Shape, label: str) -> dict:
    """bench/floor.py at the shape's resolution, the recipe's effective batch and precision."""
    model = bench.model(shape.name)
    record = bench.work / f"{label}.json"
    command = [
        sys.executable,
        str(HERE / "floor.py"),
        str(model),
        str(shape.resolution),
        str(SAMPLES_PER_STEP),
        bench.settings.precision,
        str(record),
    ]
    bench.say(f"{label}: text encoder + UNet forward and backward")
    data, wall = bench.call(label, command, bench.env("floor"), record)
    return {"ms_per_sample": data["ms_per_sample"], "wall_s": wall}


def row_sd15(bench: Bench, entry: dict, allowance: float) -> None:
    """SD 1.5 shapes at 512 px: this trainer against textual_inversion.py."""
    compare(bench, entry, bench.settings.sd, bench.args.reference, allowance)


def row_floor(bench: Bench, entry: dict, allowance: float) -> None:
    """The bare text encoder + UNet forward and backward at the SD 1.5 row's shapes."""
    entry.update(floor(bench, bench.settings.sd, f"{bench.settings.sd.name}-floor"))
    ours = bench.report["rows"]["sd15"].get("ours") or {}
    if ours.get("per_sample_ms"):
        entry["ours_over_floor"] = ours["per_sample_ms"] / entry["ms_per_sample"]


def row_memory(bench: Bench, entry: dict, allowance: float) -> None:
    """Peak allocated memory with --gradient_checkpointing; without it, from the sd15 row (or a
    short run here when that row has none)."""
    shape = bench.settings.sd
    model = bench.model(shape.name)
    trainers = ["ours", "reference"] if bench.args.reference else ["ours"]
    sd15 = bench.report["rows"]["sd15"]
    for trainer in trainers:
        steps = shape.steps(trainer).short
        runs = sd15.get("runs", {}).get(trainer, {})
        without = [r["peak_allocated_bytes"] for r in runs.values() if r.get("peak_allocated_bytes") is not None]
        if not without and bench.device.type == "cuda":
            run = bench.train(trainer, shape, model, steps, f"{shape.name}-{trainer}-memory")
            without = [run["peak_allocated_bytes"]]
        run = bench.train(
            trainer, shape, model, steps, f"{shape.name}-{trainer}-checkpointing", ("--gradient_checkpointing",)
        )
        entry[trainer] = {
            "steps": steps,
            "peak_allocated_bytes": max(without) if without else None,
            "peak_allocated_bytes_checkpointing": run["peak_allocated_bytes"],
            "peak_rss_bytes_checkpointing": run["peak_rss_bytes"],
            "in_run_ms_per_sample_checkpointing": run["in_run_ms_per_sample"],
        }
        bench.save()


def row_sdxl(bench: Bench, entry: dict, allowance: float) -> None:
    """SDXL shapes at 1024 px against textual_inversion_sdxl.py, then the SDXL floor if the
    row's share allows."""
    began = time.monotonic()
    compare(bench, entry, bench.settings.xl, bench.args.reference_sdxl, 0.85 * allowance)
    if time.monotonic() - began < allowance:
        entry["floor"] = floor(bench, bench.settings.xl, f"{bench.settings.xl.name}-floor")
        if entry["ours"]["per_sample_ms"]:
            entry["ours_over_floor"] = entry["ours"]["per_sample_ms"] / entry["floor"]["ms_per_sample"]
    else:
        entry["floor"] = {"skipped": "the row's share of the budget was spent"}


# python -c PROBE_EVAL ROOT RECORD EVAL_ARGS...: infer.py eval under probe_eval.
PROBE_EVAL = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from bench.gpu import probe_eval; "
    "probe_eval(sys.argv[1], sys.argv[2:])"
)


def probe_eval(record_path: str, argv: list[str]) -> None:
    """`infer.py eval` in this process (the scoring row's subprocess), recording at the end of
    every scored entry: the time (seconds since this call, after a torch.cuda.synchronize()),
    its images, and the images generated and seconds spent generating so far. Writes the record
    (with eval's exit status) and exits with that status."""
    import torch

    started = time.perf_counter()
    marks: list[dict] = []
    made = {"images": 0, "seconds": 0.0}
    generate, score_entry = infer.generate, infer.score_entry

    def timed_generate(*args, **kwargs):
        began = time.perf_counter()
        images = generate(*args, **kwargs)
        made["images"] += len(images)
        made["seconds"] += time.perf_counter() - began
        return images

    def marked_score_entry(*args, **kwargs):
        line = score_entry(*args, **kwargs)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        marks.append(
            {
                "time": time.perf_counter() - started,
                "label": line["label"],
                "images": line["images"],
                "generated": made["images"],
                "generating_s": made["seconds"],
            }
        )
        return line

    infer.generate, infer.score_entry = timed_generate, marked_score_entry
    status = infer.main(["eval", *argv])
    record = {"status": status, "marks": marks, "end": time.perf_counter() - started}
    Path(record_path).write_text(json.dumps(record))
    sys.exit(status)


def eval_figures(record: dict, wall: float, default_images: int) -> dict:
    """What one eval measured: per scored step, (time after the last entry - time after the
    first) / (entries - 1), and the images scored in that span per second. `default_images`: a
    step's images at eval's defaults (DreamBench's 25 object prompts x 4), projected from it."""
    marks = record["marks"]
    if len(marks) < 2:
        raise RunFailed(f"eval scored {len(marks)} entries; at least two are needed to difference them")
    first, last = marks[0], marks[-1]
    span, steps = last["time"] - first["time"], len(marks) - 1
    images = sum(mark["images"] for mark in marks[1:])
    per_image = span / images if span > 0 else None
    return {
        "entries": [mark["label"] for mark in marks],
        "images_scored": sum(mark["images"] for mark in marks),
        "generated": last["generated"],
        "per_step_s": span / steps if span > 0 else None,
        "images_per_s": None if per_image is None else 1 / per_image,
        "generating_per_step_s": (last["generating_s"] - first["generating_s"]) / steps,
        "default_step_s": None if per_image is None else default_images * per_image,
        "generating_s": last["generating_s"],
        "wall_s": wall,  # launch to exit: start-up, every entry, the table and eval.png
    }


def scoring_run(bench: Bench, shape: Shape, model: Path, folder: Path) -> str:
    """Fill `folder` with a run of `shape` that saved more than one step, as infer.py eval reads
    it: the sd15 row's long run with its short run's rows as learned_embeds-steps-N (the same
    recipe and seed: the rows the long run had at that step); without those runs, a short run
    made here that saves twice. Returns where it came from."""
    short, long = (f"{shape.name}-ours-{kind}" for kind in ("short", "long"))
    if short in bench.outputs and long in bench.outputs:
        shutil.copytree(bench.outputs[long], folder)
        rows = folder / f"learned_embeds-steps-{shape.ours.short}.safetensors"  # train() checked its step count
        shutil.copy(bench.outputs[short] / "learned_embeds.safetensors", rows)
        return "sd15"
    steps = max(2, shape.ours.short)
    label = f"{shape.name}-ours-scoring"
    bench.train("ours", shape, model, steps, label, ("--save_steps", str(steps // 2)), keep=True)
    shutil.copytree(bench.outputs[label], folder)
    return "a run made here (no sd15 row runs)"


def row_scoring(bench: Bench, entry: dict, allowance: float) -> None:
    """Scoring throughput of `python infer.py eval` (issue 16): seconds per scored step and
    images per second, on the sd15 row's output with random-weight scorers of the default
    scorers' shapes (CLIP ViT-B/32, DINO ViT-S/16; the tests' tiny ones in the smoke run), as
    bench/eval_cost.py measures it on a CPU: a first eval generating every image, then a rerun
    reusing them all (loading and scoring only). The rerun is skipped when the row's share of
    the budget cannot hold it."""
    from bench.models import build_clip_scorer, build_dino_scorer

    began = time.monotonic()
    settings, shape = bench.settings, bench.settings.sd
    model = bench.model(shape.name)
    work = bench.work / "scoring"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = scoring_run(bench, shape, model, work / "run")
    bench.say(f"scoring: building the random-weight {settings.scorers} scorers")
    started = time.monotonic()
    with bench.device:  # as the pipelines: built on the GPU, no CPU copy
        clip = build_clip_scorer(settings.scorers, work / "clip")
        dino = build_dino_scorer(settings.scorers, work / "dino")
    if bench.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    templates = infer.read_eval_prompts("object")
    prompts = infer.write_text(work / "prompts.txt", "".join(t + "\n" for t in templates[: settings.eval_prompts]))
    default_images = len(templates) * infer.build_eval_parser().get_default("num_images_per_prompt")
    entry.update(
        source=source,
        shape=shape.name,
        resolution=shape.resolution,
        scorers=settings.scorers,
        scorers_build_s=time.monotonic() - started,
        prompts=settings.eval_prompts,
        num_images_per_prompt=settings.eval_images,
        num_inference_steps=settings.eval_inference_steps,
        images_per_step=settings.eval_prompts * settings.eval_images,
        default_images_per_step=default_images,
        generate=None,
        reuse=None,
    )
    flags = ["--clip_model", str(clip), "--dino_model", str(dino), "--prompts", str(prompts),
             "--num_images_per_prompt", str(settings.eval_images),
             "--num_inference_steps", str(settings.eval_inference_steps), "--device", bench.device.type]  # fmt: skip
    env = bench.env("eval", {"MPLBACKEND": "Agg"})

    def measure(kind: str) -> dict:
        record = work / f"{kind}.json"
        command = [sys.executable, "-c", PROBE_EVAL, str(ROOT), str(record), str(work / "run"), *flags]
        bench.say(f"scoring-{kind}: infer.py eval, {settings.eval_prompts} prompts x {settings.eval_images} images")
        data, wall = bench.call(f"scoring-{kind}", command, env, record)
        entry[kind] = eval_figures(data, wall, default_images)
        bench.save()
        return entry[kind]

    spent = time.monotonic() - began
    if spent >= allowance:
        raise RowSkipped(
            f"the row's share of the budget ({allowance:.0f} s) was spent before the first eval "
            f"({spent:.0f} s on the run and the scorers)"
        )
    measure("generate")
    reason = rerun_skipped(time.monotonic() - began, allowance, entry["generate"])
    if reason:
        entry["reuse"] = {"skipped": reason}
        return
    if measure("reuse")["generated"]:
        raise RunFailed(f"the rerun generated {entry['reuse']['generated']} images: it did not reuse them all")


def rerun_skipped(spent: float, allowance: float, first: dict) -> str | None:
    """Why the scoring row's rerun is skipped (None: it fits): it needs about what the first eval
    took less its generating, and the row has `allowance` s, `spent` of them used."""
    needs = first["wall_s"] - first["generating_s"]
    if spent + needs <= allowance:
        return None
    return (
        f"the row's share of the budget was spent: {spent:.0f} s of {allowance:.0f} s used, the rerun needs "
        f"about {needs:.0f} s"
    )


def row_compile(bench: Bench, entry: dict, allowance: float) -> None:
    """One cold --compile run (compile caches off) against the plain sd15 long run."""
    settings, shape = bench.settings, bench.settings.sd
    model = bench.model(shape.name)
    plain = bench.report["rows"]["sd15"].get("runs", {}).get("ours", {}).get("long")
    low, high = settings.compile_steps
    per_step = (plain or {}).get("per_step_s") or 0.05
    steps = max(low, min(high, round(settings.compile_steady_s / per_step / 10) * 10 or low))
    if plain is None:
        plain = bench.train("ours", shape, model, steps, f"{shape.name}-ours-plain")
    caches = bench.work / "compile-caches"
    env = {
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
    }
    entry.update(backend=settings.compile_backend, steps=steps, cold=True)
    flags = ("--compile", "--compile_backend", settings.compile_backend)
    run = bench.train("ours", shape, model, steps, f"{shape.name}-ours-compile", flags, env)
    entry.update(
        startup_s=run["startup_s"],
        compile_s=run["startup_s"] - plain["startup_s"],
        in_run_ms_per_sample=run["in_run_ms_per_sample"],
        plain_in_run_ms_per_sample=plain["in_run_ms_per_sample"],
        peak_allocated_bytes=run["peak_allocated_bytes"],
    )
    if run["in_run_ms_per_sample"] and plain["in_run_ms_per_sample"]:
        entry["speedup"] = plain["in_run_ms_per_sample"] / run["in_run_ms_per_sample"]


CONCEPTS = 4  # the concepts row's K


def row_concepts(bench: Bench, entry: dict, allowance: float) -> None:
    """K concepts in one run (--concepts_list, every concept on the row's photos, each its own
    word) against K one-concept runs, one after the other. The joint run takes K times the steps
    of each separate run, so all of them together train the same samples (the joint run's batch
    shared by its concepts): what it saves is K - 1 start-ups, and its per-sample cost should
    match."""
    began = time.monotonic()
    shape, steps = bench.settings.sd, bench.settings.concepts_steps
    model = bench.model(shape.name)
    entry.update(
        shape=shape.name, resolution=shape.resolution, concepts=CONCEPTS, steps=steps, samples_per_step=SAMPLES_PER_STEP
    )
    tokens = [f"<concept-{k}>" for k in range(CONCEPTS)]
    separate = entry["separate"] = []
    for k, token in enumerate(tokens):
        if separate and (CONCEPTS - k + 1) * separate[-1]["wall_s"] > allowance - (time.monotonic() - began):
            raise BudgetSpent(f"{k} of {CONCEPTS} separate runs done; the rest and the joint run would not fit")
        separate.append(
            bench.train("ours", shape, model, steps, f"concepts-separate-{k}", ("--placeholder_token", token))
        )
        bench.save()
    listing = bench.work / "concepts.json"
    listing.write_text(json.dumps([{"placeholder_token": t, "initializer_token": "toy"} for t in tokens]))
    joint = entry["joint"] = bench.train(
        "ours", shape, model, CONCEPTS * steps, "concepts-joint", ("--concepts_list", str(listing))
    )
    samples = steps * SAMPLES_PER_STEP  # of each separate run; the joint run trains CONCEPTS times that
    separate_wall = sum(run["wall_s"] for run in separate)
    loop = [run["in_run_ms_per_sample"] for run in separate if run["in_run_ms_per_sample"]]
    entry.update(
        separate_wall_s=separate_wall,
        joint_wall_s=joint["wall_s"],
        separate_startup_s=sum(run["startup_s"] for run in separate),
        joint_startup_s=joint["startup_s"],
        separate_in_run_ms_per_sample=statistics.fmean(loop) if loop else None,
        joint_in_run_ms_per_sample=joint["in_run_ms_per_sample"],
        separate_wall_ms_per_sample=1000 * separate_wall / (CONCEPTS * samples),
        joint_wall_ms_per_sample=1000 * joint["wall_s"] / (CONCEPTS * samples),
    )


def concepts_table(row: dict) -> list[str]:
    k = row["concepts"]

    def line(label: str, key: str, fmt: str = "{:.1f}") -> str:
        separate, joint = row[f"separate_{key}"], row[f"joint_{key}"]
        return f"| {label} | {number(separate, fmt)} | {number(joint, fmt)} | {ratio(separate, joint)} |"

    return [
        f"{row['shape']} at {row['resolution']} px: {row['steps']} steps each separate run, {k} x {row['steps']} "
        f"the joint run (whose batch of {row['samples_per_step']} its {k} concepts share), the same samples in all.",
        "",
        f"| | {k} separate runs | joint run of {k} concepts | separate / joint |",
        "|---|---|---|---|",
        line("wall time, launch to exit, all runs (s)", "wall_s"),
        line("start-up, launch to the first optimizer step, all runs (s)", "startup_s"),
        line("per sample between loss read-backs (ms; separate: mean)", "in_run_ms_per_sample", "{:.2f}"),
        line("wall time per sample trained (ms)", "wall_ms_per_sample", "{:.2f}"),
    ]


@dataclass(frozen=True)
class Row:
    name: str
    share: float  # of the budget left when the row starts, among the rows still to run
    min_s: tuple[float, float]  # the least time left to start it: on a GPU, in the smoke run
    measure: Callable[[Bench, dict, float], None]


PLAN = [
    # At 200 samples/s the 3,000-step recipe takes about 75 s: 0.45 of the budget measures it whole
    # and leaves the reference a long run of some 80 steps.
    Row("sd15", 0.45, (60, 5), row_sd15),
    Row("floor", 0.03, (15, 3), row_floor),
    Row("memory", 0.09, (20, 3), row_memory),
    Row("sdxl", 0.33, (90, 5), row_sdxl),
    Row("scoring", 0.05, (20, 3), row_scoring),
    Row("compile", 0.10, (60, 3), row_compile),
    Row("concepts", 0.10, (60, 5), row_concepts),
]


# ----------------------------------------------------------------------------------------
# The machine and the report.


def machine_info(smoke: bool) -> dict:
    import accelerate
    import diffusers
    import torch
    import transformers

    info = {
        "summary": machine(),
        "gpu": None,
        "driver": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cpu_cores": os.cpu_count(),
    }
    if torch.cuda.is_available() and not smoke:
        info["gpu"] = torch.cuda.get_device_name(0)
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            line = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]
            info["gpu"], info["driver"], info["gpu_memory"] = (part.strip() for part in line.split(","))
    return info


def source_commit() -> str:
    """The commit measured: git's, or the one gpu_wheels.sh recorded where the copy has no .git."""
    try:
        found = commit()
    except OSError:  # no git on this machine
        found = "unknown"
    if found.startswith("unknown") and TRAVEL_COMMIT.exists():
        return TRAVEL_COMMIT.read_text().strip() + " (recorded by bench/gpu_wheels.sh)"
    return found


def reference_source(path: str | None) -> str | None:
    """The diffusers commit a reference copy came from (SOURCE.txt beside it, from gpu_wheels.sh)."""
    if not path:
        return None
    source = Path(path).parent / "SOURCE.txt"
    return source.read_text().strip() if source.exists() else None


def number(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def gigabytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else ""


def compare_table(entry: dict) -> list[str]:
    names = [n for n in ("ours", "reference") if entry.get(n)]
    if not names:
        return []
    ours, ref = entry.get("ours") or {}, entry.get("reference") or {}
    with_ref = "reference" in names

    def row(label: str, cells: list[str], versus: str = "") -> str:
        return f"| {label} | " + " | ".join(cells) + (f" | {versus} |" if with_ref else " |")

    runs = entry.get("runs", {})
    recipe = entry["recipe_steps"]
    lines = [
        "| | " + " | ".join(names) + (" | ours vs reference (above 1: ours ahead) |" if with_ref else " |"),
        "|---|" + "---|" * len(names) + ("---|" if with_ref else ""),
        row(
            "optimizer steps, short and long run",
            [f"{runs[n]['short']['steps']}, {runs[n]['long']['steps']}" for n in names],
        ),
        row(
            "start-up: launch to the first optimizer step (s)",
            [number(entry[n]["startup_s"]) for n in names],
            ratio(ref.get("startup_s"), ours.get("startup_s")),
        ),
        row(
            "per sample, differenced (ms)",
            [number(entry[n]["per_sample_ms"], "{:.2f}") for n in names],
            ratio(ref.get("per_sample_ms"), ours.get("per_sample_ms")),
        ),
        row("samples/s", [number(entry[n]["samples_per_s"]) for n in names]),
        row(
            f"{recipe:,}-step recipe ({recipe * SAMPLES_PER_STEP:,} samples), wall time (s)",
            [f"{number(entry[n]['recipe_wall_s'])} ({entry[n]['recipe_wall']})" for n in names],
            ratio(ref.get("recipe_wall_s"), ours.get("recipe_wall_s")),
        ),
        row(
            "peak allocated (GB)",
            [gigabytes(entry[n]["peak_allocated_bytes"]) for n in names],
            ratio(ref.get("peak_allocated_bytes"), ours.get("peak_allocated_bytes")),
        ),
        row("peak host memory, RSS (GB)", [gigabytes(entry[n]["peak_rss_bytes"]) for n in names]),
    ]
    return lines


def goals_table(rows: dict, smoke: bool) -> list[str]:
    """The issue's goals beside the figures (SD 1.5 shapes, 512 px, bf16, 1 x 4)."""
    sd15, memory = rows.get("sd15", {}), rows.get("memory", {})
    ours = sd15.get("ours") or {}
    speedup = (sd15.get("speedup") or {}).get("per_sample_ms")
    checkpointing = (memory.get("ours") or {}).get("peak_allocated_bytes_checkpointing")
    recipe_wall = ours.get("recipe_wall_s")
    goals = [
        ("at least 200 samples/s", ours.get("samples_per_s"), 200, number(ours.get("samples_per_s"))),
        ("at least 10x the reference per sample", speedup, 10, number(speedup, "{:.2f}x")),
        (
            "the 3,000-step recipe in at most 90 s, start-up included",
            None if recipe_wall is None else -recipe_wall,
            -90,
            f"{number(recipe_wall)} s ({ours.get('recipe_wall', 'n/a')})",
        ),
        (
            "peak allocated at most 4 GB with --gradient_checkpointing",
            None if checkpointing is None else -checkpointing,
            -4e9,
            f"{gigabytes(checkpointing)} GB",
        ),
    ]
    lines = ["| goal (issue 17) | figure | |", "|---|---|---|"]
    for goal, value, threshold, shown in goals:
        verdict = "n/a" if value is None else ("met" if value >= threshold else "missed")
        lines.append(f"| {goal} | {shown} | {'smoke run: tiny shapes on a CPU' if smoke else verdict} |")
    return lines


SCORER_NAMES = {"real": "CLIP ViT-B/32 and DINO ViT-S/16", "tiny": "tests' tiny CLIP and DINO"}


def scoring_table(row: dict) -> list[str]:
    first = row["generate"]
    source = "the sd15 row's run" if row["source"] == "sd15" else row["source"]
    lines = [
        f"`infer.py eval` of {source} ({row['shape']} at {row['resolution']} px; "
        f"entries {', '.join(first['entries'])}): "
        f"{row['prompts']} prompts x {row['num_images_per_prompt']} images = {row['images_per_step']} images a step, "
        f"{row['num_inference_steps']} denoising steps each; scorers of the {SCORER_NAMES[row['scorers']]} shapes "
        f"(random weights, built in {row['scorers_build_s']:.0f} s). Per scored step: (time after the last entry - "
        "time after the first) / (entries - 1), in the eval's own process.",
        "",
        "| | per scored step (s) | of it generating (s) | images/s | a step of "
        f"{row['default_images_per_step']} images (eval's default count), projected (s) | eval wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in (
        ("generate", "first eval: generate + score"),
        ("reuse", "rerun: every image reused (score only)"),
    ):
        figures = row.get(kind)
        if figures and figures.get("skipped"):
            lines.append(f"| {label} | skipped: {figures['skipped']} | | | | |")
        elif figures:
            lines.append(
                f"| {label} | {number(figures['per_step_s'], '{:.3f}')} | "
                f"{number(figures['generating_per_step_s'], '{:.3f}')} | {number(figures['images_per_s'])} | "
                f"{number(figures['default_step_s'])} | {number(figures['wall_s'])} |"
            )
    return lines


def markdown(report: dict) -> str:
    """The section for bench/RESULTS.md."""
    machine, rows, settings = report["machine"], report["rows"], report["settings"]
    title = (
        "CPU smoke run of bench/gpu.py (tiny shapes: no GPU figure)"
        if report["smoke"]
        else ("GPU: SD 1.5 and SDXL shapes, the cat-toy recipe (bench/gpu.py)")
    )
    where = machine["summary"].split(", torch ")[0]  # the versions follow
    if machine["gpu"]:
        where = (
            f"{machine['gpu']} (driver {machine['driver']}, {machine.get('gpu_memory', '?')}), "
            f"{machine['cpu_cores']} CPU cores"
        )
    lines = [
        f"### {title}",
        "",
        f"- date: {report['date']}; commit: {report['commit']}; machine: {where}; torch {machine['torch']}, "
        f"CUDA {machine['cuda']}, diffusers {machine['diffusers']}, transformers {machine['transformers']}, "
        f"accelerate {machine['accelerate']}, Python {machine['python']}",
        f"- command: `{report['command']}`",
        f"- recipe: batch {BATCH} x accumulation {ACCUMULATION}, lr 5e-4 scaled, constant, seed 0, precision "
        f"{settings['precision']}; photos: {settings['photos']}; models: random weights of the real shapes "
        f"(bench/models.py), built on the {settings['device']}",
        f"- reference: {settings['reference'] or 'none given'}"
        + (f" ({settings['reference_source']})" if settings.get("reference_source") else "")
        + f"; SDXL reference: {settings['reference_sdxl'] or 'none given'}",
        f"- this call: {report['elapsed_s']:.0f} s of a {settings['budget_s']:.0f} s budget; rows: "
        + ", ".join(f"{name} {row['status']}" for name, row in rows.items()),
        "",
        "Per sample: the wall-clock difference of a short and a long run (first optimizer step to a "
        "synchronized exit) over the extra samples. Start-up: launch to the first optimizer step. "
        "The recipe's wall time is measured when the long run was the whole recipe, else start-up + "
        "samples x per sample (projected).",
    ]
    for name, row in rows.items():
        lines += ["", f"#### {name}: {row['status']}" + (f" ({row['reason']})" if row.get("reason") else "")]
        if name in ("sd15", "sdxl") and row.get("recipe_steps"):
            lines += ["", f"{row['shape']} at {row['resolution']} px, model built in {row['build_s']:.0f} s.", ""]
            lines += compare_table(row)
            floor_ = row.get("floor") or {}
            if floor_.get("ms_per_sample"):
                over = ratio((row.get("ours") or {}).get("per_sample_ms"), floor_["ms_per_sample"]) or "n/a"
                lines += ["", f"Floor: {floor_['ms_per_sample']:.2f} ms/sample; ours / floor: {over}."]
        elif name == "floor" and row.get("ms_per_sample"):
            lines += [
                "",
                f"Bare text encoder + UNet forward and backward, batch {SAMPLES_PER_STEP}: "
                f"{row['ms_per_sample']:.2f} ms/sample; ours / floor: "
                f"{number(row.get('ours_over_floor'), '{:.2f}x')}.",
            ]
        elif name == "memory":
            for trainer in ("ours", "reference"):
                if row.get(trainer):
                    m = row[trainer]
                    lines.append(
                        f"- {trainer}: peak allocated {gigabytes(m['peak_allocated_bytes'])} GB without, "
                        f"{gigabytes(m['peak_allocated_bytes_checkpointing'])} GB with --gradient_checkpointing "
                        f"({m['steps']} steps)"
                    )
        elif name == "scoring" and row.get("generate"):
            lines += ["", *scoring_table(row)]
        elif name == "compile" and row.get("startup_s") is not None:
            lines.append(
                f"- backend {row['backend']}, cold, {row['steps']} steps: first optimizer step "
                f"{row['startup_s']:.1f} s after launch ({number(row['compile_s'])} s more than without); "
                f"{number(row['in_run_ms_per_sample'], '{:.2f}')} ms/sample against "
                f"{number(row['plain_in_run_ms_per_sample'], '{:.2f}')} without (between loss read-backs); "
                f"speed-up {number(row.get('speedup'), '{:.2f}x')}"
            )
        elif name == "concepts" and row.get("joint_wall_s") is not None:
            lines += ["", *concepts_table(row)]
        if row.get("error"):
            lines += ["", "```", row["error"], "```"]
    lines += ["", *goals_table(rows, report["smoke"])]
    return "\n" + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="The same plan at the tiny shapes, on the CPU.")
    p.add_argument("--budget_s", type=float, default=360, help="Wall-clock limit of the whole call (seconds).")
    p.add_argument("--reference", default=None, help="diffusers' textual_inversion.py (rows sd15, memory).")
    p.add_argument("--reference_sdxl", default=None, help="diffusers' textual_inversion_sdxl.py (row sdxl).")
    p.add_argument("--data", default=None, help="Photos (default: duck_toy if found, else synthetic ones).")
    p.add_argument(
        "--rows", default=None, help="Comma-separated rows to run (default: all): " + ", ".join(r.name for r in PLAN)
    )
    p.add_argument("--out", default=str(CACHE / "gpu"), help="Folder for gpu.json and gpu.md.")
    p.add_argument("--workdir", default=None, help="Where models and runs go (default: a temporary folder).")
    args = p.parse_args(argv)
    if args.rows:
        args.rows = [name.strip() for name in args.rows.split(",") if name.strip()]
        unknown = sorted(set(args.rows) - {r.name for r in PLAN})
        if unknown:
            p.error(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join(r.name for r in PLAN)}")
    for flag in ("reference", "reference_sdxl", "data"):
        value = getattr(args, flag)
        if value and not Path(value).exists():
            p.error(f"--{flag} {value}: no such file or folder")
    return args


class NotReady(Exception):
    """Something a GPU call needs is missing: one line, exit status 2."""


def check_ready(args: argparse.Namespace) -> None:
    """What a GPU call needs, checked before any device time is spent."""
    import torch

    if args.smoke:
        return
    if not torch.cuda.is_available():
        raise NotReady("no CUDA GPU here; run on one, or pass --smoke for the CPU plan")
    if not VOCAB.exists():
        raise NotReady(f"{VOCAB} is missing: run bench/gpu_wheels.sh where pip works and bring it along")
    if (args.reference or args.reference_sdxl) and not (
        importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    ):
        raise NotReady("--reference: diffusers' scripts log to tensorboard by default; install tensorboard")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("diffusers") is None:
        print(
            "error: diffusers is not installed: on a machine without it, install .whl/ from bench/gpu_wheels.sh "
            "(bench/README.md, The GPU figures in one call)",
            file=sys.stderr,
        )
        return 2
    args = parse_args(argv)
    try:
        check_ready(args)
    except NotReady as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = SMOKE if args.smoke else GPU
    if args.smoke and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ti-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = {
        "schema": 1,
        "smoke": args.smoke,
        "date": datetime.date.today().isoformat(),
        "commit": source_commit(),
        "command": "python " + shlex.join(["bench/gpu.py", *argv]),
        "machine": machine_info(args.smoke),
        "settings": {},
        "elapsed_s": 0.0,
        "rows": {row.name: {"status": "pending"} for row in PLAN},
        "runs": [],  # every subprocess in launch order: label, launched (s into this call), seconds, CPU s, status
    }
    state = Bench(args, settings, work, report)
    report["settings"] = {
        "budget_s": args.budget_s,
        "device": state.device.type,
        "precision": settings.precision,
        "batch": BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "recipe_steps": settings.recipe_steps,
        "shapes": {"sd": [settings.sd.name, settings.sd.resolution], "xl": [settings.xl.name, settings.xl.resolution]},
        "photos": f"{state.photos.name} ({sum(1 for p in state.photos.iterdir() if p.is_file())} files)",
        "reference": args.reference,
        "reference_source": reference_source(args.reference),
        "reference_sdxl": args.reference_sdxl,
    }
    report["settings"]["warm_up_s"] = warm_up(args.smoke)
    state.save()
    signal.signal(signal.SIGTERM, interrupted)
    try:
        run_plan(state)
    except KeyboardInterrupt:
        state.say("interrupted: gpu.json holds the rows so far")
        return 130
    finally:
        state.save()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    return 0


def warm_up(smoke: bool) -> float:
    """One-time costs of a bare machine, paid here so that no run's figures hold them (the first
    run would pay them, the second not): matplotlib's font cache, built on its first figure, and
    on the GPU machine the byte-code of diffusers, installed there without it (--no-compile)."""
    started = time.monotonic()
    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure = plt.figure(figsize=(1, 1))
        figure.text(0.5, 0.5, "warm-up")
        figure.savefig(io.BytesIO(), format="png")
        plt.close(figure)
    if not smoke:
        import compileall

        import diffusers

        folder = Path(diffusers.__file__).parent
        if os.access(folder, os.W_OK):
            compileall.compile_dir(folder, quiet=1, workers=os.cpu_count() or 1)
    return time.monotonic() - started


def interrupted(signum: int, frame) -> None:
    raise KeyboardInterrupt  # stops the run in progress (run_until) and keeps gpu.json


def run_plan(state: Bench) -> None:
    rows, args = state.report["rows"], state.args
    selected = [row for row in PLAN if not args.rows or row.name in args.rows]
    spent = False
    for row in PLAN:
        entry = rows[row.name]
        min_s = row.min_s[1] if args.smoke else row.min_s[0]
        if row not in selected:
            entry.update(status="skipped", reason="not in --rows")
        elif spent or state.left() < min_s:
            entry.update(status="skipped", reason=f"budget: {max(state.left(), 0):.0f} s left, the row needs {min_s} s")
        else:
            later = selected[selected.index(row) :]
            allowance = state.left() * row.share / sum(r.share for r in later)
            began = time.monotonic()
            state.say(f"row {row.name}: {allowance:.0f} s of the {state.left():.0f} s left")
            entry["status"] = "running"
            try:
                row.measure(state, entry, allowance)
                entry["status"] = "done"
            except BudgetSpent as e:
                entry.update(status="stopped", reason=f"budget: {e}")
                spent = True
            except KeyboardInterrupt:
                entry.update(status="stopped", reason="interrupted (SIGINT or SIGTERM)")
                raise
            except RowSkipped as e:
                entry.update(status="skipped", reason=str(e))
            except RunFailed as e:
                entry.update(status="failed", reason=str(e), error=e.tail)
            except Exception as e:  # a broken row must not cost the rows after it
                entry.update(status="failed", reason=f"{type(e).__name__}: {e}", error=tail(traceback.format_exc()))
            entry["seconds"] = time.monotonic() - began
            state.say(f"row {row.name}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else ""))
            if entry.get("error"):
                print(entry["error"], file=sys.stderr)
        state.save()


if __name__ == "__main__":
    sys.exit(main())
