"""What `infer.py eval` costs per scored step: wall seconds, differenced so start-up and model
loading cancel out, split into generating the images and scoring them.

    python bench/eval_cost.py --scorers real --photos ../shared/data/dreambooth/duck_toy

It trains one small run of the `tiny` shape (bench/models.py) saving every 2 steps, copies it
without its -steps- files, and times `infer.py eval` on both folders: the full run has two more
entries (steps) than the copy, so (long - short) / 2 is the cost of one scored step. Each eval
runs twice in a row: first generating every image, then reusing them all (loading and scoring
only); the pair runs --repeats times, alternating the folders, and the fastest time counts.
Scorers: `real` has the shapes of openai/clip-vit-base-patch32 and facebook/dino-vits16 (random
weights), `tiny` the tests' shapes. Appends a section to bench/RESULTS.md (--results - to skip).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.bench import commit, machine  # noqa: E402
from bench.models import build_clip_scorer, build_dino_scorer, build_pipeline  # noqa: E402


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scorers", default="real", choices=["real", "tiny"])
    p.add_argument("--photos", required=True, help="A folder of training photos (e.g. DreamBench's duck_toy).")
    p.add_argument("--prompts", default="object", help="As infer.py eval's --prompts (default: DreamBench's 25).")
    p.add_argument("--images", type=int, default=4, help="--num_images_per_prompt (default 4).")
    p.add_argument("--inference_steps", type=int, default=30, help="--num_inference_steps (default 30).")
    p.add_argument("--resolution", type=int, default=64, help="Training and image size (default 64).")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every process (default 1).")
    p.add_argument("--repeats", type=int, default=2, help="Runs of each eval; the fastest counts (default 2).")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="File to append to; - to skip.")
    args = p.parse_args()

    # One thread: on a shared 2-core machine, a second torch thread spin-waits against other jobs and can
    # make the tiny models many times slower (the tests run on one thread for the same reason).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        pipe = build_pipeline("tiny", tmp / "pipe")
        clip, dino = build_clip_scorer(args.scorers, tmp / "clip"), build_dino_scorer(args.scorers, tmp / "dino")
        run = tmp / "long"
        train = [sys.executable, "textual_inversion.py", "--pretrained_model_name_or_path", str(pipe),
                 "--train_data_dir", args.photos, "--placeholder_token", "<concept>", "--initializer_token", "toy",
                 "--resolution", str(args.resolution), "--train_batch_size", "1", "--max_train_steps", "6",
                 "--save_steps", "2", "--learning_rate", "5e-3", "--seed", "0", "--report_to", "none",
                 "--output_dir", str(run)]  # fmt: skip
        timed(train, env)
        short = Path(shutil.copytree(run, tmp / "short"))
        for path in short.glob("learned_embeds-steps-*"):
            path.unlink()
        flags = ["--clip_model", str(clip), "--dino_model", str(dino), "--prompts", args.prompts,
                 "--num_images_per_prompt", str(args.images),
                 "--num_inference_steps", str(args.inference_steps)]  # fmt: skip
        seconds = {}
        for repeat in range(args.repeats):  # alternated, so a burst of load elsewhere hits both sizes
            for name, folder in (("short", short), ("long", run)):
                shutil.rmtree(folder / "eval", ignore_errors=True)
                command = [sys.executable, "infer.py", "eval", str(folder), *flags]
                for kind in ("generate", "reuse"):
                    took = timed(command, env)
                    seconds[name, kind] = min(took, seconds.get((name, kind), took))
                    print(f"repeat {repeat + 1}, {name}, {kind}: {took:.1f} s", file=sys.stderr)
        lines = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
        count = next(line["images"] for line in lines if line["step"] == 2)  # images per scored step
        per_step = {kind: (seconds["long", kind] - seconds["short", kind]) / 2 for kind in ("generate", "reuse")}
    load_after = os.getloadavg()

    title = (
        f"`infer.py eval`: seconds per scored step on CPU, tiny SD shape at {args.resolution} px, "
        f"{args.scorers} scorers"
    )
    command = " ".join(["python", "bench/eval_cost.py", *sys.argv[1:]])
    lines = [
        f"### {title}",
        "",
        f"- date: {datetime.date.today().isoformat()}; commit: {commit()}; machine: {machine()}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (1-minute, on {os.cpu_count()} cores)",
        f"- command: `{command}`",
        f"- what: `infer.py eval` on a 6-step run saving every 2 steps (entries: step 0, 2, 4, 6) and on a copy "
        f"without its -steps- files (step 0, 6); {args.prompts} prompts x {args.images} images = {count} images per "
        f"step, {args.inference_steps} DPM++ steps each; scorers with the shapes of "
        + (
            "openai/clip-vit-base-patch32 and facebook/dino-vits16"
            if args.scorers == "real"
            else "the tests' tiny ones"
        )
        + f" (random weights); {args.threads} thread(s); each eval run {args.repeats} times, alternating, the"
        " fastest kept; per scored step ="
        " (long - short) / 2",
        "",
        "| | 2 entries (s) | 4 entries (s) | per scored step (s) | per image (ms) |",
        "|---|---|---|---|---|",
    ]
    for kind, label in (
        ("generate", "first eval: generate + score"),
        ("reuse", "rerun: every image reused (score only)"),
    ):
        per_image = 1000 * per_step[kind] / count
        lines.append(
            f"| {label} | {seconds['short', kind]:.1f} | {seconds['long', kind]:.1f} | {per_step[kind]:.1f} | "
            f"{per_image:.0f} |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    if args.results != "-":
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
