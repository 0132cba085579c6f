"""This trainer side by side with diffusers' textual_inversion example, on one recipe.

    python bench/bench.py --shape tiny --resolution 512 \\
        --reference /path/to/diffusers/examples/textual_inversion/textual_inversion.py

One after the other, on the same random-weight model of a real shape (bench/models.py), the
same photos, recipe (the diffusers docs' cat-toy recipe: batch 1 x accumulation 4, lr 5e-4
scaled, constant), precision and seed, it runs:
  - the floor: a bare text-encoder + UNet forward/backward at the recipe's effective batch,
    the least any trainer must spend per sample;
  - this trainer, and the reference when --reference is given (the user supplies that file; a
    temporary copy of it imports bench/shims/pil_transforms.py instead of torchvision).
Each trainer runs a short and a long run: differencing their wall times gives the cost per
sample without start-up, as the issue measured it. A 2-step run with a checkpoint after step 1
gives the checkpoint size. Every run is a subprocess under bench/probe.py, which records the
optimizer-step times, the logged losses and the peak memory.

It prints a table and appends it, with the date, commit, machine and this exact command, to
bench/RESULTS.md (--results - to skip). Compute depends on shapes, not weight values, so the
figures hold for the real models of these shapes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.models import CACHE, build_pipeline  # noqa: E402

DEFAULT_RESOLUTION = {"tiny": 512, "tiny-xl": 512, "sd15": 512, "sdxl": 1024}
PLACEHOLDER = "<bench-concept>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(DEFAULT_RESOLUTION), help="Model shape (bench/models.py).")
    p.add_argument("--model_dir", default=None, help="Use this diffusers folder instead of building the shape.")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dreambooth" / "duck_toy"))
    p.add_argument("--resolution", type=int, default=None, help="Default: 512, or 1024 for sdxl.")
    p.add_argument("--precision", default=None, choices=["no", "fp16", "bf16"], help="Default: bf16 on CUDA, else no.")
    p.add_argument("--steps", default="6,18", help="Optimizer steps of the short and the long run.")
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--gradient_accumulation_steps", type=int, default=4)
    p.add_argument("--reference", default=None, help="diffusers' textual_inversion.py (or _sdxl.py) to compare.")
    p.add_argument("--ours_flags", default="", help="Extra flags for this trainer only (a lever to measure).")
    p.add_argument("--reference_flags", default="", help="Extra flags for the reference only.")
    p.add_argument("--both_flags", default="", help="Extra flags for both (e.g. --gradient_checkpointing).")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Environment for the trainer runs, e.g. TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for a cold compile.",
    )
    p.add_argument(
        "--captions_and_masks",
        action="store_true",
        help="Train on a copy of --data with a caption and a mask per photo (--caption_extension .txt "
        "--masked_loss), to compare with the plain run on the same photos.",
    )
    p.add_argument("--no_floor", action="store_true", help="Skip the bare text-encoder + UNet measurement.")
    p.add_argument("--no_checkpoint", action="store_true", help="Skip the checkpoint-size runs.")
    p.add_argument("--label", default="", help="A title for this measurement in RESULTS.md.")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="File to append to; - to skip.")
    p.add_argument("--workdir", default=None, help="Where runs write (default: a temporary folder).")
    args = p.parse_args(argv)
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.shape]
    args.short, args.long = (int(s) for s in args.steps.split(","))
    if not 0 < args.short < args.long:
        p.error("--steps SHORT,LONG with 0 < SHORT < LONG")
    return args


# ----------------------------------------------------------------------------------------
# The machine and the code measured.


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}"


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    # Code changes make a figure belong to no commit; the results file growing does not.
    changed = [
        line for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if "RESULTS.md" not in line
    ]
    return head + ("-dirty" if changed else "")


def captioned_and_masked_copy(photos: Path, folder: Path) -> Path:
    """A copy of the photos, each with a caption file and a mask (a centred ellipse)."""
    from PIL import Image, ImageDraw, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))):
        shutil.copy2(photo, folder / photo.name)
        (folder / f"{photo.stem}.txt").write_text(f"a [name] on a wooden table, photo number {i}", encoding="utf-8")
        with Image.open(photo) as image:
            width, height = ImageOps.exif_transpose(image).size
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).ellipse((width * 0.2, height * 0.15, width * 0.8, height * 0.85), fill=255)
        mask.save(folder / f"{photo.stem}-masklabel.png")
    return folder


def model_folder(args: argparse.Namespace) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    folder = CACHE / "models" / args.shape
    if not (folder / "model_index.json").exists():
        print(f"building the random-weight {args.shape} pipeline in {folder} (once)", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        build_pipeline(args.shape, folder)
    return folder


# ----------------------------------------------------------------------------------------
# Runs.


def recipe(args: argparse.Namespace, model: Path, out: Path, steps: int, precision: str) -> list[str]:
    """The flags both trainers get: the cat-toy recipe of the diffusers docs, nothing saved
    mid-run (checkpoint size is measured on its own)."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(args.data),
        "--learnable_property", "object",
        "--placeholder_token", PLACEHOLDER,
        "--initializer_token", "toy",
        "--resolution", str(args.resolution),
        "--train_batch_size", str(args.train_batch_size),
        "--gradient_accumulation_steps", str(args.gradient_accumulation_steps),
        "--max_train_steps", str(steps),
        "--learning_rate", "5.0e-04",
        "--scale_lr",
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--seed", "0",
        "--mixed_precision", precision,
        "--output_dir", str(out),
        "--save_steps", "1000000",
        "--checkpointing_steps", "1000000",
        *shlex.split(args.both_flags),
    ]  # fmt: skip


def reference_copy(path: Path, folder: Path) -> Path:
    """The reference, importing the PIL stand-in where it imported torchvision."""
    text = Path(path).read_text()
    line = "from torchvision import transforms"
    if line not in text:
        raise SystemExit(f"--reference {path}: no '{line}' line; is it diffusers' textual_inversion script?")
    copy = folder / f"reference_{Path(path).name}"
    copy.write_text(text.replace(line, "import pil_transforms as transforms"))
    return copy


def run_probe(script: Path, flags: list[str], record: Path, env: dict) -> dict:
    command = [sys.executable, str(HERE / "probe.py"), str(record), str(script), *flags]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not record.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        raise SystemExit(f"{script.name} failed (exit {done.returncode}):\n{tail}")
    return {**json.loads(record.read_text()), "wall": wall}


def checkpoint_size(folder: Path) -> int:
    checkpoints = sorted(folder.glob("checkpoint-*"))
    if not checkpoints:
        return 0
    return sum(p.stat().st_size for p in checkpoints[0].rglob("*") if p.is_file())


def step_losses(result: dict, trainer: str, accumulation: int) -> list[tuple[int, float]]:
    """(optimizer step, loss) pairs from the logged values. This trainer logs the mean over its
    logging interval at the interval's last step; the reference logs every micro-batch, which
    are averaged here per optimizer step."""
    logs = [entry for entry in result["logs"] if "loss" in entry]
    if trainer == "ours":
        return [(int(entry["step"]), entry["loss"]) for entry in logs]
    grouped: dict[int, list[float]] = {}
    for index, entry in enumerate(logs):
        grouped.setdefault(index // accumulation + 1, []).append(entry["loss"])
    return [(step, statistics.fmean(values)) for step, values in sorted(grouped.items())]


def measure(args: argparse.Namespace, trainer: str, script: Path, model: Path, work: Path, precision: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(item.split("=", 1) for item in args.env)
    extra = shlex.split(args.ours_flags if trainer == "ours" else args.reference_flags)
    if trainer == "ours":
        # Per-step losses for the comparison; on GPU every 10 steps, so that reading them back
        # does not add a host sync per step. (Flags given with --ours_flags come later and win.)
        extra = ["--logging_steps", "1" if precision == "no" else "10", *extra]
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "shims"), env.get("PYTHONPATH")]))
    runs = {}
    for name, steps in (("short", args.short), ("long", args.long)):
        out = work / f"{trainer}-{name}"
        print(f"  {trainer}: {steps} steps", file=sys.stderr)
        runs[name] = run_probe(
            script, recipe(args, model, out, steps, precision) + extra, work / f"{trainer}-{name}.json", env
        )
    if not args.no_checkpoint:
        out = work / f"{trainer}-checkpoint"
        flags = recipe(args, model, out, 2, precision) + extra
        flags[flags.index("--checkpointing_steps") + 1] = "1"
        print(f"  {trainer}: checkpoint size", file=sys.stderr)
        run_probe(script, flags, work / f"{trainer}-checkpoint.json", env)
        runs["checkpoint_bytes"] = checkpoint_size(out)
    return summarize(args, trainer, runs)


def summarize(args: argparse.Namespace, trainer: str, runs: dict) -> dict:
    per_step = args.train_batch_size * args.gradient_accumulation_steps
    short, long = runs["short"], runs["long"]
    steps = long["steps"]
    if len(steps) != args.long:
        raise SystemExit(f"{trainer}: recorded {len(steps)} optimizer steps, expected {args.long}")
    # Steady state: the last three quarters of the long run's optimizer steps.
    first = max(1, args.long // 4)
    steady = (len(steps) - first) * per_step / (steps[-1] - steps[first - 1])
    differenced = (long["wall"] - short["wall"]) / ((args.long - args.short) * per_step)
    if differenced <= 0:  # the extra steps cost less than start-up varies: too few steps to tell
        differenced = None
    losses = step_losses(long, trainer, args.gradient_accumulation_steps)
    return {
        "unet_calls_per_step": len(long.get("unet_calls", [])) / len(steps),
        "unet_shapes": sorted({tuple(shape[2:]) for shape in long.get("unet_calls", [])}),
        "first_step_s": steps[0],
        "steady_samples_per_s": steady,
        "differenced_ms_per_sample": None if differenced is None else 1000 * differenced,
        "wall_s": long["wall"],
        "peak_rss_gb": long["peak_rss_bytes"] / 2**30,
        "cuda_peak_gb": None
        if long["cuda_peak_allocated_bytes"] is None
        else long["cuda_peak_allocated_bytes"] / 2**30,
        "checkpoint_bytes": runs.get("checkpoint_bytes"),
        "losses": losses,
    }


# ----------------------------------------------------------------------------------------
# The floor (bench/floor.py): bare text encoder + UNet forward and backward.


def floor(args: argparse.Namespace, model: Path, work: Path, precision: str) -> float:
    script = HERE / "floor.py"
    record = work / "floor.json"
    batch = args.train_batch_size * args.gradient_accumulation_steps
    command = [sys.executable, str(script), str(model), str(args.resolution), str(batch), precision, str(record)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit("floor measurement failed:\n" + "\n".join(done.stderr.splitlines()[-20:]))
    return json.loads(record.read_text())["ms_per_sample"]


# ----------------------------------------------------------------------------------------
# Report.


def loss_windows(
    losses: list[tuple[int, float]], last_step: int, windows: int = 3
) -> list[tuple[int, int, float, float, int]]:
    """(first step, last step, mean, std, count) of the logged losses in equal windows of steps."""
    edges = [round(last_step * k / windows) for k in range(windows + 1)]
    out = []
    for lo, hi in itertools.pairwise(edges):
        values = [loss for step, loss in losses if lo < step <= hi]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out.append((lo + 1, hi, statistics.fmean(values), std, len(values)))
    return out


def report(args: argparse.Namespace, figures: dict, floor_ms: float | None, precision: str, command: str) -> str:
    ours, ref = figures.get("ours"), figures.get("reference")
    names = [n for n in ("ours", "reference") if n in figures]

    def row(label: str, key: str, fmt: str, better: str | None = None) -> str:
        values = [figures[n][key] for n in names]
        cells = ["n/a" if v is None else fmt.format(v) for v in values]
        ratio = ""
        if better and ref is not None and None not in values and values[0] and values[1]:
            value = values[0] / values[1] if better == "higher" else values[1] / values[0]
            ratio = f"{value:.2f}x"
        return f"| {label} | " + " | ".join(cells) + (f" | {ratio} |" if ref is not None else " |")

    per_step = args.train_batch_size * args.gradient_accumulation_steps
    lines = [
        f"### {args.label or args.shape + ' at ' + str(args.resolution) + ' px'}",
        "",
        f"- date: {datetime.date.today().isoformat()}; commit: {commit()}; machine: {machine()}",
        f"- model: `{args.shape}` (random weights, bench/models.py), {args.resolution} px, precision {precision}, "
        f"batch {args.train_batch_size} x accumulation {args.gradient_accumulation_steps} = {per_step} samples/step, "
        f"photos: {Path(args.data).name}, steps {args.short} and {args.long}",
        f"- command: `{command}`",
        "",
        "| | " + " | ".join(names) + (" | ours vs reference |" if ref is not None else " |"),
        "|---|" + "---|" * len(names) + ("---|" if ref is not None else ""),
        row("time to first optimizer step (s)", "first_step_s", "{:.1f}", "lower"),
        row(
            f"per sample, differenced {args.short} to {args.long} steps (ms)",
            "differenced_ms_per_sample",
            "{:.0f}",
            "lower",
        ),
        row("steady samples/s (last 3/4 of the long run)", "steady_samples_per_s", "{:.2f}", "higher"),
        row(f"wall time, {args.long} steps, start-up included (s)", "wall_s", "{:.1f}", "lower"),
        row("peak RSS (GiB)", "peak_rss_gb", "{:.2f}", "lower"),
        row("peak CUDA allocated (GiB)", "cuda_peak_gb", "{:.2f}", "lower"),
        row("checkpoint size (bytes)", "checkpoint_bytes", "{:,}", "lower"),
        row("UNet calls per optimizer step (training)", "unet_calls_per_step", "{:.2f}"),
    ]
    shapes = "; ".join(f"{name}: " + ", ".join(f"{h}x{w}" for h, w in figures[name]["unet_shapes"]) for name in names)
    lines += ["", f"Latent shapes (h x w) of the training UNet calls: {shapes}."]
    if floor_ms is not None:
        ratios = [
            f"{name} / floor: {figures[name]['differenced_ms_per_sample'] / floor_ms:.2f}x"
            for name in names
            if figures[name]["differenced_ms_per_sample"] is not None
        ]
        lines += [
            "",
            f"Floor (bare text encoder + UNet forward/backward at batch {per_step}): {floor_ms:.0f} ms/sample. "
            + "; ".join(ratios)
            + ".",
        ]
    lines += ["", "Training loss over the long run, mean ± std of per-step values, by window:", ""]
    for name in names:
        windows = loss_windows(figures[name]["losses"], args.long)
        text = "; ".join(f"steps {a}-{b}: {m:.4f} ± {s:.4f} (n={n})" for a, b, m, s, n in windows)
        lines.append(f"- {name}: {text}")
    if ref is not None:
        pairs = zip(loss_windows(ours["losses"], args.long), loss_windows(ref["losses"], args.long))
        z = [
            f"{abs(a[2] - b[2]) / math.sqrt(a[3] ** 2 / a[4] + b[3] ** 2 / b[4]):.1f}" if min(a[4], b[4]) > 1 else "n/a"
            for a, b in pairs
        ]
        lines.append(f"- difference of means in standard errors, by window: {', '.join(z)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.reference and not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        raise SystemExit("the reference logs to tensorboard by default: pip install tensorboard")
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "no")
    command = "python " + shlex.join(["bench/bench.py", *(sys.argv[1:] if argv is None else argv)])
    model = model_folder(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ti-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench: {args.shape} at {args.resolution} px, precision {precision}, runs in {work}", file=sys.stderr)
    if args.captions_and_masks:
        args.data = str(captioned_and_masked_copy(Path(args.data), work / f"{Path(args.data).name}-captions-masks"))
        args.ours_flags += " --caption_extension .txt --masked_loss"
    floor_ms = None if args.no_floor else floor(args, model, work, precision)
    figures = {"ours": measure(args, "ours", ROOT / "textual_inversion.py", model, work, precision)}
    if args.reference:
        script = reference_copy(Path(args.reference), work)
        figures["reference"] = measure(args, "reference", script, model, work, precision)
    text = report(args, figures, floor_ms, precision, command)
    print(text)
    if args.results != "-":
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
