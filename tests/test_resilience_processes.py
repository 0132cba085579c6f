"""No work lost when the process itself is stopped: SIGTERM, SIGKILL at random moments, a signal
to one of two processes, a launcher that dies, a stop before training (model loading, the Hub,
checkpoint reading, latent caching). Each test waits for a marker (a metrics line, a checkpoint,
a reader on a named pipe), never for a fixed time, and gives every process a timeout."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, train_args, train_once
from safetensors.torch import load_file

import infer
import textual_inversion as ti

pytestmark = pytest.mark.slow  # processes stopped by signals

STEPS = 12  # enough that no run ends before the signal it waits for reaches it
TIMEOUT = 600  # generous: a loaded machine, never a timing assertion
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # the same arithmetic in every run


def trainer_argv(model: Path, photos: Path, out: Path, **flags) -> list[str]:
    return train_args(model, photos, out, **{"max_train_steps": STEPS, "logging_steps": 1, **flags})


# Exec'd in front of the command: SIGINT as a terminal's foreground job has it. A background job
# of a non-interactive shell (a CI runner's, `cmd &` in a script) inherits SIGINT ignored, and
# the trainer rightly keeps an ignored signal ignored, as nohup asks. (An exec keeps the pid.)
TAKES_CTRL_C = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])",
]


def start(argv: list[str], log: Path, launcher: list[str] | None = None, script: list[str] | None = None, **env):
    """The trainer (under `launcher`) in a session of its own, as a terminal's foreground job or a
    Slurm job step is: its process group is what Ctrl-C and `scancel` signal."""
    script = script or [str(ROOT / "textual_inversion.py")]
    command = [*TAKES_CTRL_C, *(launcher or [sys.executable]), *script, *argv]
    with open(log, "a") as stream:
        return subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env={**ENV, **env}, start_new_session=True
        )


def accelerate_launch(processes: int) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if processes > 1:
        command.append("--multi_gpu")  # with ACCELERATE_USE_CPU: really two CPU processes (see test_ddp.py)
    return [*command, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def finish(argv: list[str], log: Path) -> int:
    process = start(argv, log)
    try:
        return process.wait(timeout=TIMEOUT)
    finally:
        process.kill()


def wait_for(condition, process: subprocess.Popen) -> bool:
    """True once `condition()` holds; False if the process ended first."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the trainer never reached the marker")
        time.sleep(0.05)
    return True


def records(out: Path) -> list[dict]:
    """metrics.jsonl as it stands, without a torn last line and without the timing."""
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n") if path.exists() else []
    parsed = []
    for line in lines:
        try:
            parsed.append({k: v for k, v in json.loads(line).items() if k != "samples_per_second"})
        except json.JSONDecodeError:
            continue
    return parsed


def trained_a_step(out: Path) -> bool:
    return any(r["step"] >= 1 for r in records(out))


def checkpoints(out: Path) -> set[Path]:
    return set(ti.list_checkpoints(out)) if out.exists() else set()


def learned(out: Path) -> torch.Tensor:
    return load_file(out / "learned_embeds.safetensors")["<concept>"]


def error_lines(log: Path) -> list[str]:
    # "\n" only: a message glued onto the progress bar ("...\rerror: ...") must not pass.
    return [line for line in log.read_text().split("\n") if "error:" in line]


@pytest.fixture(scope="module")
def reference(tiny_sd, photos, tmp_path_factory) -> Path:
    """An uninterrupted run, in a process of its own like the runs it is compared with."""
    out = tmp_path_factory.mktemp("reference") / "out"
    log = out.parent / "log"
    assert finish(trainer_argv(tiny_sd, photos, out), log) == 0, log.read_text()[-3000:]
    return out


def test_sigterm_ends_the_step_saves_a_checkpoint_and_exits_for_a_requeue(tiny_sd, photos, tmp_path, reference):
    out, log = tmp_path / "out", tmp_path / "log"
    argv = trainer_argv(tiny_sd, photos, out, checkpointing_steps=1000, checkpointing_minutes=0)
    trainer = start(argv, log)
    assert wait_for(lambda: trained_a_step(out), trainer), log.read_text()[-3000:]
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM, log.read_text()[-3000:]

    [checkpoint] = checkpoints(out)
    step = ti.read_checkpoint(checkpoint)["state"]["step"]
    assert error_lines(log) == [
        f"error: stopped by SIGTERM at step {step}; saved {checkpoint}; to continue, run the same command "
        "with --resume_from_checkpoint latest"
    ]
    assert [r["step"] for r in records(out)][-1] == step
    assert not (out / infer.LOCK_FILE).exists()

    assert finish([*argv, "--resume_from_checkpoint", "latest"], log) == 0, log.read_text()[-3000:]
    assert torch.equal(learned(out), learned(reference))


def assert_nothing_half_written(out: Path) -> None:
    """Whatever `latest`, the loaders and infer.py would take for complete, is complete."""
    for checkpoint in ti.list_checkpoints(out):
        ti.read_checkpoint(checkpoint)
        infer.read_embedding(checkpoint)
    for path in out.glob("learned_embeds*.safetensors"):
        infer.read_embedding(path)
    lines = (out / "metrics.jsonl").read_text().split("\n")
    for line in lines[:-1]:  # all but a torn last line
        json.loads(line)


def test_sigkill_at_random_moments_loses_nothing_and_resume_repeats_the_run_bit_for_bit(
    tiny_sd, photos, tmp_path, reference
):
    out, log = tmp_path / "out", tmp_path / "log"
    argv = trainer_argv(tiny_sd, photos, out, checkpointing_steps=1, save_steps=1, resume_from_checkpoint="latest")
    moments = random.Random(11)
    kills = 0
    while kills < 4:
        before = checkpoints(out)
        trainer = start(argv, log)
        if not wait_for(lambda before=before: checkpoints(out) - before, trainer):
            break  # it finished first
        time.sleep(moments.uniform(0, 0.4))  # somewhere in a step, a checkpoint, an embedding or a log line
        trainer.kill()
        trainer.wait(timeout=TIMEOUT)
        kills += 1
        assert_nothing_half_written(out)
    assert kills >= 2
    assert finish(argv, log) == 0, log.read_text()[-3000:]
    assert torch.equal(learned(out), learned(reference))
    assert records(out) == records(reference)


def test_a_signal_to_one_of_two_processes_stops_both_at_one_step_with_one_checkpoint(tiny_sd, photos, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    argv = trainer_argv(tiny_sd, photos, out, max_train_steps=1000, checkpointing_steps=1000, train_batch_size=1)
    launcher = start(argv, log, accelerate_launch(2), ACCELERATE_USE_CPU="true")
    try:
        assert wait_for(lambda: trained_a_step(out), launcher), log.read_text()[-3000:]
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if p.environ().get("RANK")]
        [second] = [p for p in workers if p.environ()["RANK"] == "1"]
        second.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=TIMEOUT) != 0
        _, hanging = psutil.wait_procs(workers, timeout=TIMEOUT)
        assert not hanging
    finally:
        launcher.kill()
    [checkpoint] = checkpoints(out)
    step = ti.read_checkpoint(checkpoint)["state"]["step"]
    assert f"error: stopped by SIGTERM at step {step}; saved {checkpoint}" in "\n".join(error_lines(log))
    assert not (out / infer.LOCK_FILE).exists()


def test_a_launcher_killed_outright_loses_at_most_the_steps_since_the_last_checkpoint(
    tiny_sd, photos, tmp_path, reference
):
    """Killed outright (SIGKILL, the OOM killer), a launcher passes nothing on, and accelerate 1.16+
    takes its trainer's stderr along: the trainer ends at its next line of output, or runs on to
    the end. Either way every file is whole and the run resumes to the same result."""
    out, log = tmp_path / "out", tmp_path / "log"
    argv = trainer_argv(tiny_sd, photos, out, checkpointing_steps=2)
    launcher = start(argv, log, accelerate_launch(1), ACCELERATE_USE_CPU="true")
    try:
        assert wait_for(lambda: checkpoints(out), launcher), log.read_text()[-3000:]
        [trainer] = psutil.Process(launcher.pid).children()
        launcher.kill()
        launcher.wait(timeout=TIMEOUT)
        _, running_on = psutil.wait_procs([trainer], timeout=TIMEOUT)
        assert not running_on
    finally:
        launcher.kill()
    assert_nothing_half_written(out)
    assert not (out / infer.LOCK_FILE).exists()
    assert finish([*argv, "--resume_from_checkpoint", "latest"], log) == 0, log.read_text()[-3000:]
    assert torch.equal(learned(out), learned(reference))


# ----------------------------------------------------------------------------------------
# A stop before training starts ends the run at once, with the script's last line and status
# 128 + the signal's number: never taken for bad input (a corrupt checkpoint, a Hub error).
# Each run blocks exactly where the signal must land, reading a named pipe nobody writes to.

BEFORE_TRAINING = "stopped by {} before training started (nothing to save)"


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def reader_waits_on(fifo: Path, process: subprocess.Popen) -> int:
    """Once `process` reads the named pipe `fifo`: the pipe's write end, held open so the read
    goes on waiting until it is closed."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the trainer never read {fifo}")
        time.sleep(0.05)


def stopped_while_reading(fifo: Path, process: subprocess.Popen, signum: int, log: Path) -> None:
    """Signal `process` while it waits on `fifo`; it must end with its stop line and 128 + signum."""
    writer = reader_waits_on(fifo, process)
    try:
        os.killpg(process.pid, signum)
        assert process.wait(timeout=TIMEOUT) == 128 + signum, log.read_text()[-3000:]
    finally:
        os.close(writer)
        process.kill()
    assert error_lines(log) == [f"error: {BEFORE_TRAINING.format(signal.Signals(signum).name)}"], log.read_text()


def test_a_stop_while_the_model_comes_from_the_hub_is_not_a_hub_error(photos, tmp_path):
    hub = socket.create_server(("127.0.0.1", 0))  # a Hub that takes the request and never answers
    hub.settimeout(TIMEOUT)
    out, log = tmp_path / "out", tmp_path / "log"
    argv = trainer_argv("someone/model", photos, out)
    endpoint = f"http://127.0.0.1:{hub.getsockname()[1]}"
    trainer = start(argv, log, HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))
    try:
        connection, _ = hub.accept()  # the download of its model_index.json has begun
        trainer.send_signal(signal.SIGINT)
        assert trainer.wait(timeout=TIMEOUT) == 128 + signal.SIGINT, log.read_text()[-3000:]
    finally:
        trainer.kill()
        hub.close()
    connection.close()
    assert error_lines(log) == [f"error: {BEFORE_TRAINING.format('SIGINT')}"], log.read_text()
    assert not out.exists()


def test_a_stop_while_reading_a_checkpoint_never_skips_it_as_corrupt(tiny_sd, photos, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    argv = trainer_argv(tiny_sd, photos, out, max_train_steps=2, checkpointing_steps=1)
    train_once(argv)
    state = out / "checkpoint-2" / ti.CHECKPOINT_STATE
    state.unlink()
    os.mkfifo(state)  # the newest checkpoint, on a disk that takes its time
    before = snapshot(out)
    trainer = start([*argv, "--resume_from_checkpoint", "latest"], log)
    stopped_while_reading(state, trainer, signal.SIGTERM, log)
    assert "corrupt" not in log.read_text() and "step 0" not in log.read_text()
    assert snapshot(out) == before


# Run in front of main: the named pipe (argv[1]) is read as the latents are about to be cached.
AT_LATENT_CACHING = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import textual_inversion as ti
encode_photos = ti.encode_photos
def encode_after_reading(*args, **kwargs):
    open(sys.argv[1], "rb").read()
    return encode_photos(*args, **kwargs)
ti.encode_photos = encode_after_reading
sys.exit(ti.main(sys.argv[2:]))
"""


def test_a_stop_while_caching_latents_ends_the_run_and_keeps_the_last_checkpoint(tiny_sd, photos, tmp_path):
    out, log, fifo = tmp_path / "out", tmp_path / "log", tmp_path / "latents"
    argv = trainer_argv(tiny_sd, photos, out, max_train_steps=2, checkpointing_steps=1)
    train_once(argv)
    before = snapshot(out)
    os.mkfifo(fifo)
    trainer = start([str(fifo), *argv, "--resume_from_checkpoint", "latest"], log, script=["-c", AT_LATENT_CACHING])
    stopped_while_reading(fifo, trainer, signal.SIGINT, log)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------
# Signals as users send them: to the whole process group. Ctrl-C in a terminal and a
# scheduler's SIGTERM reach the launcher too, which passes a SIGTERM (accelerate) or the same
# signal (torchrun) on to its trainer. Steps of about a second (256 px, 1 x 4 samples on this
# CPU) put that echo in the middle of a step.

LONG_STEPS = dict(resolution=256, gradient_accumulation_steps=4, max_train_steps=6)


def long_argv(model: Path, photos: Path, out: Path, **flags) -> list[str]:
    return trainer_argv(model, photos, out, **{**LONG_STEPS, "checkpointing_steps": 1000, **flags})


@pytest.fixture(scope="module")
def straight_long(tiny_sd, photos, tmp_path_factory):
    """Uninterrupted long-step runs under one and two processes: {processes: learned rows}."""
    rows = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp(f"straight{processes}") / "out"
        log = out.parent / "log"
        launcher = start(long_argv(tiny_sd, photos, out), log, accelerate_launch(processes), ACCELERATE_USE_CPU="true")
        try:
            assert launcher.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
        finally:
            launcher.kill()
        rows[processes] = learned(out)
    return rows


def trainers_under(launcher: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in children if any(part.endswith("textual_inversion.py") for part in p.cmdline())]


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_launchers_process_group_saves_one_checkpoint_and_resumes_bit_for_bit(
    tiny_sd, photos, tmp_path, straight_long, processes, signum
):
    out, log = tmp_path / "out", tmp_path / "log"
    argv = long_argv(tiny_sd, photos, out)
    launcher = start(argv, log, accelerate_launch(processes), ACCELERATE_USE_CPU="true")
    try:
        assert wait_for(lambda: trained_a_step(out), launcher), log.read_text()[-3000:]
        trainers = trainers_under(launcher)
        assert len(trainers) == processes
        os.killpg(launcher.pid, signum)
        launcher.wait(timeout=TIMEOUT)  # the launcher may be gone long before its trainer
        _, still_running = psutil.wait_procs(trainers, timeout=TIMEOUT)
        assert not still_running
    finally:
        launcher.kill()

    [checkpoint] = checkpoints(out)
    step = ti.read_checkpoint(checkpoint)["state"]["step"]
    assert error_lines(log)[-1] == (
        f"error: stopped by {signal.Signals(signum).name} at step {step}; saved {checkpoint}; to continue, run the "
        "same command with --resume_from_checkpoint latest"
    )
    assert not (out / infer.LOCK_FILE).exists()
    resumed = start(
        [*argv, "--resume_from_checkpoint", "latest"], log, accelerate_launch(processes), ACCELERATE_USE_CPU="true"
    )
    assert resumed.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    assert torch.equal(learned(out), straight_long[processes])


def test_ctrl_c_to_two_processes_training_several_concepts_resumes_every_concept_bit_for_bit(
    tiny_sd, photos, other_photos, tmp_path
):
    """The user's path with --concepts_list: `accelerate launch` with two processes, Ctrl-C to the
    terminal's process group mid-run, then the same command with --resume_from_checkpoint latest."""
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([
        {"placeholder_token": "<dog>", "train_data_dir": str(photos), "initializer_token": "dog"},
        {"placeholder_token": "<hat>", "train_data_dir": str(other_photos), "initializer_token": "hat",
         "num_vectors": 2},
    ]))  # fmt: skip

    def argv(out: Path) -> list[str]:
        return long_argv(tiny_sd, None, out, placeholder_token=None, concepts_list=concepts)

    def launch(arguments: list[str], log: Path) -> subprocess.Popen:
        return start(arguments, log, accelerate_launch(2), ACCELERATE_USE_CPU="true")

    straight, out, log = tmp_path / "straight", tmp_path / "out", tmp_path / "log"
    process = launch(argv(straight), log)
    assert process.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    launcher = launch(argv(out), log)
    try:
        assert wait_for(lambda: trained_a_step(out), launcher), log.read_text()[-3000:]
        trainers = trainers_under(launcher)
        os.killpg(launcher.pid, signal.SIGINT)
        launcher.wait(timeout=TIMEOUT)
        assert not psutil.wait_procs(trainers, timeout=TIMEOUT)[1]
    finally:
        launcher.kill()
    [checkpoint] = checkpoints(out)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["concepts.json", "dog", "hat", ti.CHECKPOINT_STATE]
    assert error_lines(log)[-1].startswith("error: stopped by SIGINT at step ")
    resumed = launch([*argv(out), "--resume_from_checkpoint", "latest"], log)
    assert resumed.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    for name, token in (("dog", "<dog>"), ("hat", "<hat>")):
        done = load_file(out / name / "learned_embeds.safetensors")[token]
        assert torch.equal(done, load_file(straight / name / "learned_embeds.safetensors")[token])


def test_a_second_ctrl_c_ends_the_trainer_at_once_and_leaves_every_file_whole(tiny_sd, photos, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    argv = long_argv(tiny_sd, photos, out, gradient_accumulation_steps=32, checkpointing_steps=1)  # steps of seconds
    trainer = start(argv, log)  # plain python: the user's second Ctrl-C reaches the trainer itself
    assert wait_for(lambda: trained_a_step(out) and checkpoints(out), trainer), log.read_text()[-3000:]
    step = max(r["step"] for r in records(out))

    def next_step_begun() -> bool:  # the step after `step` logged and checkpointed: the loop is in the next one
        newest = max(r["step"] for r in records(out))
        return newest > step and (out / f"checkpoint-{newest}").exists()

    assert wait_for(next_step_begun, trainer)
    os.killpg(trainer.pid, signal.SIGINT)
    time.sleep(0.3)  # well inside the step of seconds that just began: the first stop is still finishing it
    os.killpg(trainer.pid, signal.SIGINT)
    assert trainer.wait(timeout=TIMEOUT) == -signal.SIGINT  # ended by the signal itself, not by a clean stop
    assert not any("stopped by" in line for line in error_lines(log))
    assert_nothing_half_written(out)
