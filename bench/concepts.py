"""One joint run of K concepts (--concepts_list) against K one-concept runs, on a CPU.

    python bench/concepts.py                          # K=3, the tiny shape at 512 px, 12 steps
    python bench/concepts.py --shape sd15 --steps 3   # real SD 1.5 shapes (random weights)

In one invocation, one run after the other (never in parallel) and each with OMP_NUM_THREADS
set to --threads: K separate runs, each one concept (its own photos and word), then one run of
all K concepts from a concepts file. Every run has the same recipe (batch 1 x accumulation 4,
seed 0, no tracker, no checkpoint, validation only at start-up); the separate runs take --steps
steps each and the joint run K x --steps, so it trains as many samples as the K separate runs
together (its batch is shared by the concepts in proportion to their photos), and the whole
runs compare directly.

Per run, under bench/probe.py (which records the optimizer-step times):
  - wall time: the parent's clock, from launch to exit;
  - start-up: launch to the first optimizer step;
  - in-loop per sample: from metrics.jsonl's samples_per_second (--logging_steps 1, so one
    window a step), the first window (which holds the first step's one-time costs) left out.
Photos: K different subjects of ../shared/data/dreambooth when there are that many, else
synthetic ones (bench/gpu.py's). Prints a markdown table and appends it, with date, commit,
machine, load average before and after, and this command, to bench/RESULTS.md (--results - to skip).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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

from bench.bench import DEFAULT_RESOLUTION, commit, machine, model_folder  # noqa: E402
from bench.models import TINY_WORDS  # noqa: E402

SAMPLES_PER_STEP = 4  # batch 1 x accumulation 4
DREAMBOOTH = ROOT.parent / "shared" / "data" / "dreambooth"
LARGE = "1000000"  # a step interval no run reaches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", type=int, default=3, help="K: concepts in the joint run, and separate runs.")
    p.add_argument("--shape", default="tiny", choices=sorted(DEFAULT_RESOLUTION), help="Model shape (bench/models.py).")
    p.add_argument("--model_dir", default=None, help="Use this diffusers folder instead of building the shape.")
    p.add_argument("--resolution", type=int, default=None, help="Default: 512, or 1024 for sdxl.")
    p.add_argument("--steps", type=int, default=12, help="--max_train_steps of every run, joint and separate.")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of every run.")
    p.add_argument("--data", default=str(DREAMBOOTH), help="A folder of subject folders (one per concept).")
    p.add_argument("--label", default="", help="A title for this measurement in RESULTS.md.")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="File to append to; - to skip.")
    p.add_argument("--workdir", default=None, help="Where runs write (default: a temporary folder).")
    args = p.parse_args(argv)
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.shape]
    if args.concepts < 1 or args.steps < 3:
        p.error("--concepts at least 1, --steps at least 3 (the first step's window is left out)")
    return args


def subjects(args: argparse.Namespace, work: Path) -> list[tuple[Path, str]]:
    """K (photo folder, initializer word): different DreamBooth subjects, else synthetic photos."""
    data = Path(args.data)
    found = sorted(p for p in data.iterdir() if p.is_dir() and any(p.iterdir())) if data.is_dir() else []
    if len(found) >= args.concepts:
        # The class word ends the folder's name (duck_toy, red_cartoon, cat2); the tiny vocabulary
        # knows these as single tokens, and a word it does not know falls back to "toy".
        words = [p.name.split("_")[-1].rstrip("0123456789") for p in found[: args.concepts]]
        return [(p, w if w in TINY_WORDS else "toy") for p, w in zip(found, words)]
    from bench.gpu import synthetic_photo

    print(f"fewer than {args.concepts} subjects in {data}: synthetic photos", file=sys.stderr)
    folders = []
    for k in range(args.concepts):
        folder = work / "photos" / f"subject{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            synthetic_photo(512, 100 * k + i).save(folder / f"{i:02d}.jpg", quality=90)
        folders.append((folder, "toy"))
    return folders


def recipe(args: argparse.Namespace, model: Path, out: Path, steps: int) -> list[str]:
    """The flags every run gets; each run adds its concept(s)."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--resolution", str(args.resolution),
        "--train_batch_size", "1",
        "--gradient_accumulation_steps", "4",
        "--max_train_steps", str(steps),
        "--learning_rate", "5.0e-04",
        "--scale_lr",
        "--lr_scheduler", "constant",
        "--seed", "0",
        "--mixed_precision", "no",
        "--output_dir", str(out),
        "--logging_steps", "1",
        "--report_to", "none",
        "--save_steps", LARGE,
        "--checkpointing_steps", LARGE,
        "--checkpointing_minutes", "0",
        "--validation_steps", LARGE,
    ]  # fmt: skip


def run(args: argparse.Namespace, flags: list[str], out: Path, record: Path, steps: int) -> dict:
    """One trainer run under bench/probe.py: wall, start-up and in-loop per sample."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "MPLBACKEND": "Agg",
    }
    command = [sys.executable, str(HERE / "probe.py"), str(record), str(ROOT / "textual_inversion.py"), *flags]
    launched_epoch, started = time.time(), time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not record.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        raise SystemExit(f"{out.name} failed (exit {done.returncode}):\n{tail}")
    probe = json.loads(record.read_text())
    if len(probe["steps"]) != steps:
        raise SystemExit(f"{out.name}: {len(probe['steps'])} optimizer steps recorded, {steps} asked")
    speeds = [r["samples_per_second"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in r]
    if len(speeds) != steps:
        raise SystemExit(f"{out.name}: {len(speeds)} logged steps in metrics.jsonl, {steps} asked")
    # One step per window (--logging_steps 1); the first window holds the first step's one-time costs.
    in_loop_ms = 1000 * statistics.fmean(1 / s for s in speeds[1:])
    return {
        "wall_s": wall,
        "startup_s": probe["start_epoch"] - launched_epoch + probe["steps"][0],
        "in_loop_ms_per_sample": in_loop_ms,
        "samples": steps * SAMPLES_PER_STEP,
    }


def measure(args: argparse.Namespace, model: Path, work: Path) -> tuple[list[dict], dict, list[Path]]:
    chosen = subjects(args, work)
    entries = [
        {"placeholder_token": f"<concept-{k}>", "train_data_dir": str(photos), "initializer_token": word}
        for k, (photos, word) in enumerate(chosen)
    ]
    separate = []
    for k, entry in enumerate(entries):
        out = work / f"separate-{k}"
        flags = [*recipe(args, model, out, args.steps), *(x for key, v in entry.items() for x in (f"--{key}", v))]
        print(f"  separate run {k + 1}/{args.concepts}: {Path(entry['train_data_dir']).name}", file=sys.stderr)
        separate.append(run(args, flags, out, work / f"separate-{k}.json", args.steps))
        shutil.rmtree(out)
    concepts_file = work / "concepts.json"
    concepts_file.write_text(json.dumps(entries, indent=1))
    out = work / "joint"
    print(f"  joint run of {args.concepts} concepts", file=sys.stderr)
    steps = args.steps * args.concepts  # as many samples as the separate runs together
    flags = [*recipe(args, model, out, steps), "--concepts_list", str(concepts_file)]
    joint = run(args, flags, out, work / "joint.json", steps)
    written = sorted(p.name for p in out.iterdir() if (p / "learned_embeds.safetensors").exists())
    expected = sorted(f"concept-{k}" for k in range(args.concepts))
    if written != expected:
        raise SystemExit(f"the joint run wrote concept folders {written}, not {expected}")
    return separate, joint, [photos for photos, _ in chosen]


def report(args: argparse.Namespace, separate: list[dict], joint: dict, photos: list[Path], loads: list, command: str):
    k = args.concepts
    total_wall = sum(r["wall_s"] for r in separate)
    total_startup = sum(r["startup_s"] for r in separate)
    total_samples = sum(r["samples"] for r in separate)
    mean_loop = statistics.fmean(r["in_loop_ms_per_sample"] for r in separate)

    def each(key: str, fmt: str) -> str:
        return ", ".join(fmt.format(r[key]) for r in separate)

    rows = [
        "| | separate runs, each | separate runs, together | joint run | separate / joint |",
        "|---|---|---|---|---|",
        f"| samples trained | {each('samples', '{}')} | {total_samples} | {joint['samples']} | |",
        f"| wall time, launch to exit (s) | {each('wall_s', '{:.1f}')} | {total_wall:.1f} | "
        f"{joint['wall_s']:.1f} | {total_wall / joint['wall_s']:.2f}x |",
        f"| start-up, launch to the first optimizer step (s) | {each('startup_s', '{:.1f}')} | "
        f"{total_startup:.1f} (paid {k} times) | {joint['startup_s']:.1f} (paid once) | "
        f"{total_startup / joint['startup_s']:.2f}x |",
        f"| in-loop per sample (ms, metrics.jsonl) | {each('in_loop_ms_per_sample', '{:.0f}')} | "
        f"{mean_loop:.0f} (mean) | {joint['in_loop_ms_per_sample']:.0f} | "
        f"{mean_loop / joint['in_loop_ms_per_sample']:.2f}x |",
        "| wall time per sample trained (ms) | "
        + ", ".join(f"{1000 * r['wall_s'] / r['samples']:.0f}" for r in separate)
        + f" | {1000 * total_wall / total_samples:.0f} | {1000 * joint['wall_s'] / joint['samples']:.0f} | "
        f"{(total_wall / total_samples) / (joint['wall_s'] / joint['samples']):.2f}x |",
    ]
    title = args.label or f"CPU, {args.shape} at {args.resolution} px: {k} concepts in one run against {k} runs"
    load = "; ".join(f"{name}: {' '.join(f'{x:.2f}' for x in values)}" for name, values in loads)
    return "\n".join(
        [
            "",
            f"### {title}",
            "",
            f"- date: {datetime.date.today().isoformat()}; commit: {commit()}; machine: {machine()}",
            f"- load average (1, 5, 15 min) {load}; the machine is shared, so read small differences as noise",
            f"- model: `{args.shape}` (random weights, bench/models.py), {args.resolution} px, precision no, "
            f"batch 1 x accumulation 4 = 4 samples/step, {args.steps} steps each separate run and {k * args.steps} "
            "the joint run (the same samples in all), seed 0, "
            f"OMP_NUM_THREADS={args.threads} every run, one run at a time; photos: "
            + ", ".join(p.name for p in photos),
            f"- command: `{command}`",
            "",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python " + shlex.join(["bench/concepts.py", *argv])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ti-concepts-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = model_folder(args)
        before = os.getloadavg()
        separate, joint, photos = measure(args, model, work)
        after = os.getloadavg()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    section = report(args, separate, joint, photos, [("before", before), ("after", after)], command)
    print(section)
    if args.results != "-":
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(section)


if __name__ == "__main__":
    main()
