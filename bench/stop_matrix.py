"""Stop a training run every way users and schedulers do, and check that nothing is lost.

    python bench/stop_matrix.py [--launchers python,accelerate,accelerate-2,torchrun]
                                [--signals SIGINT,SIGTERM] [--deliveries trainer,launcher,group]

For each launcher x signal x delivery it starts a run of the tiny random-weight pipeline in a
session of its own (as a terminal's foreground job or a Slurm job step is), waits until step 2
is logged, then sends the signal to the training process alone, to the launcher alone, or to
the whole process group (what Ctrl-C, `scancel` and `kill -TERM -PGID` do). Steps are long
enough (256 px, 1 x 4 samples) for a launcher's echo of the stop to land mid-step. It then
checks what the issue promises: exactly one checkpoint, the script's own last line naming it
and the resume command, and a resume that ends bit for bit where an uninterrupted run does.
It prints a markdown table; nothing here is a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

STEPS = 8
TIMEOUT = 600


def launcher_command(launcher: str) -> list[str]:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    accelerate += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return {
        "python": [sys.executable],
        "accelerate": [*accelerate, "--num_processes", "1"],
        # With ACCELERATE_USE_CPU, --multi_gpu really starts two CPU processes (torchrun inside).
        "accelerate-2": [*accelerate, "--multi_gpu", "--num_processes", "2"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    }[launcher]


def trainer_args(model: Path, photos: Path, out: Path, *extra: str) -> list[str]:
    flags = dict(
        pretrained_model_name_or_path=model,
        train_data_dir=photos,
        output_dir=out,
        placeholder_token="<concept>",
        initializer_token="toy",
        resolution=256,
        train_batch_size=1,
        gradient_accumulation_steps=4,
        max_train_steps=STEPS,
        logging_steps=1,
        checkpointing_steps=1000,
        checkpointing_minutes=0,
        learning_rate=5e-3,
        seed=0,
        report_to="none",
    )
    return [str(ROOT / "textual_inversion.py"), *(x for k, v in flags.items() for x in (f"--{k}", str(v))), *extra]


# Exec'd in front of the command: SIGINT as a terminal's foreground job has it. A background job
# of a non-interactive shell (a CI runner's, `cmd &` in a script) inherits SIGINT ignored, and
# the trainer rightly keeps an ignored signal ignored, as nohup asks. (An exec keeps the pid.)
TAKES_CTRL_C = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])",
]


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["HF_HUB_OFFLINE"] = "1"
    with open(log, "a") as stream:
        command = [*TAKES_CTRL_C, *command]
        return subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().split("\n") if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a torn last line
            steps.append(json.loads(line).get("step", 0))
    return max(steps)


def trainers_of(launcher: subprocess.Popen) -> list:
    import psutil

    command = launcher.args[len(TAKES_CTRL_C) :]
    found = [launcher.pid] if command[1:2] != ["-m"] else []
    children = psutil.Process(launcher.pid).children(recursive=True)
    found += [c.pid for c in children if "textual_inversion.py" in " ".join(c.cmdline())]
    return [psutil.Process(pid) for pid in found]


def run_case(launcher: str, signame: str, delivery: str, model: Path, photos: Path, work: Path) -> dict:
    import psutil
    from safetensors.torch import load_file

    out, log = work / "out", work / "log"
    command = [*launcher_command(launcher), *trainer_args(model, photos, out)]
    process = start(command, log)
    deadline = time.monotonic() + TIMEOUT
    while logged_step(out) < 2:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            return {"result": f"no step 2 (exit {process.returncode})"}
        time.sleep(0.05)
    trainers = trainers_of(process)
    signum = getattr(signal, signame)
    if delivery == "group":
        os.killpg(process.pid, signum)
    elif delivery == "launcher":
        os.kill(process.pid, signum)
    else:
        trainers[-1].send_signal(signum)  # with two processes: rank 1's, not the one writing files
    try:
        process.wait(timeout=TIMEOUT)
    finally:
        _, alive = psutil.wait_procs(trainers, timeout=TIMEOUT)
        for leftover in alive:
            leftover.kill()
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    lines = [line for line in log.read_text().split("\n") if line.strip()]
    script_lines = [line for line in lines if line.startswith("error: ")]
    last = script_lines[-1] if script_lines else ""
    row = {"checkpoints": checkpoints, "last line": last, "hung": bool(alive)}
    if len(checkpoints) != 1 or "--resume_from_checkpoint latest" not in last or checkpoints[0] not in last:
        row["result"] = "LOST: " + (", ".join(checkpoints) or "no checkpoint")
        return row
    resumed = start([*command, "--resume_from_checkpoint", "latest"], log)
    row["resume exit"] = resumed.wait(timeout=TIMEOUT)
    row["stop step"] = int(checkpoints[0].split("-")[1])
    row["learned"] = load_file(out / "learned_embeds.safetensors")["<concept>"] if row["resume exit"] == 0 else None
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launchers", default="python,accelerate,accelerate-2,torchrun")
    parser.add_argument("--signals", default="SIGINT,SIGTERM")
    parser.add_argument("--deliveries", default="trainer,launcher,group")
    parser.add_argument("--work", default=None, help="Folder for the runs (default: a temp folder).")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from bench.models import build_pipeline
    from tests.conftest import make_photo

    work = Path(args.work or tempfile.mkdtemp(prefix="stop-matrix-"))
    model = build_pipeline("tiny", work / "tiny")
    photos = work / "photos"
    for i, size in enumerate([(96, 72), (64, 80), (72, 72)]):
        make_photo(photos / f"{i}.png", size, i + 1)

    straight = {}
    rows = []
    print("| launcher | signal | sent to | checkpoints | the script's last line | resumed bit for bit |")
    print("|---|---|---|---|---|---|")
    for launcher in args.launchers.split(","):
        processes = 2 if launcher in ("accelerate-2", "torchrun") else 1
        if processes not in straight:
            out = work / f"straight-{processes}"
            done = start([*launcher_command(launcher), *trainer_args(model, photos, out)], work / "straight.log")
            assert done.wait(timeout=TIMEOUT) == 0, (work / "straight.log").read_text()[-3000:]
            straight[processes] = load_file(out / "learned_embeds.safetensors")["<concept>"]
        for signame in args.signals.split(","):
            for delivery in args.deliveries.split(","):
                if launcher == "python" and delivery == "launcher":
                    continue  # the launcher is the trainer
                case = work / f"{launcher}-{signame}-{delivery}"
                case.mkdir(parents=True, exist_ok=True)
                row = run_case(launcher, signame, delivery, model, photos, case)
                exact = row.get("learned") is not None and torch.equal(row["learned"], straight[processes])
                verdict = row.get("result") or ("yes" if exact else f"NO (resume exit {row.get('resume exit')})")
                last = row.get("last line", "").replace(str(case), "…")
                print(
                    f"| {launcher} | {signame} | {delivery} | {', '.join(row.get('checkpoints', [])) or '-'} "
                    f"| {last} | {verdict} |",
                    flush=True,
                )
                rows.append(verdict == "yes")
    return 0 if all(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
