"""No work lost, in this process: write errors, checkpoint integrity, the output-folder lock,
time-based checkpoints, the Hub's retries and the CPU thread hint. (Signals and kills, which
need a process of their own: test_resilience_processes.py.)"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import train_args, train_once
from safetensors.torch import load_file

import infer
import textual_inversion as ti

STEPS = 4


def learned(out: Path, name: str = "learned_embeds.safetensors") -> torch.Tensor:
    return load_file(out / name)["<concept>"]


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp"))


def only_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.fixture(scope="module")
def straight(tiny_sd, photos, tmp_path_factory) -> torch.Tensor:
    """The embedding of an uninterrupted run: what every interrupted run must end with."""
    out = tmp_path_factory.mktemp("straight") / "out"
    train_once(train_args(tiny_sd, photos, out, max_train_steps=STEPS))
    return learned(out)


# The one atomic writer.


def no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_failed_write_names_the_file_and_cause_and_keeps_the_old_file(tmp_path):
    target = infer.write_text(tmp_path / "notes.txt", "old")

    def fill_then_fail(tmp):
        Path(tmp).write_text("half")
        raise no_space(tmp)

    with pytest.raises(infer.UserError, match=f"cannot write {target}: no space left on device"):
        infer.atomic_write(target, fill_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_failed_folder_write_keeps_the_old_folder_and_names_it(tmp_path):
    folder = infer.atomic_folder(tmp_path / "checkpoint-1", lambda f: infer.write_text(f / "a.txt", "old"))

    def fill_then_fail(f):
        infer.write_text(f / "a.txt", "new")
        raise no_space(f / "b.txt")

    with pytest.raises(infer.UserError, match=f"cannot write {folder}: no space left on device"):
        infer.atomic_folder(folder, fill_then_fail)
    assert (folder / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_a_failed_append_is_cut_back_off(tmp_path, monkeypatch):
    log = infer.append_text(tmp_path / "metrics.jsonl", '{"step": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise no_space(log)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(infer.UserError, match="metrics.jsonl: no space left on device"):
        infer.append_text(log, '{"step": 2}\n')
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'


def test_a_jsonl_log_is_read_without_its_torn_last_line_even_one_cut_mid_character(tmp_path):
    log = tmp_path / "metrics.jsonl"
    whole = '{"step": 1}\n{"step": 2, "prompt": "caf\u00e9"}\n'
    torn = '{"step": 3, "prompt": "caf\u00e9"}'.encode()[:-3]  # cut inside the two bytes of é
    log.write_bytes(whole.encode() + torn)
    assert infer.read_jsonl(log) == [{"step": 1}, {"step": 2, "prompt": "caf\u00e9"}]


def test_a_jsonl_log_that_does_not_exist_has_no_records(tmp_path):
    assert infer.read_jsonl(tmp_path / "metrics.jsonl") == []


@pytest.fixture
def disk_full_at(monkeypatch):
    """disk_full_at(part): an atomic write whose path contains `part` fails with ENOSPC after
    writing its data, as a disk that fills up during the write."""

    def arm(part: str) -> None:
        real = infer.atomic_write

        def atomic_write(path, write):
            if part not in str(path):
                return real(path, write)

            def write_then_fail(tmp):
                write(tmp)
                raise no_space(tmp)

            return real(path, write_then_fail)

        monkeypatch.setattr(infer, "atomic_write", atomic_write)

    return arm


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resume_finishes_bit_exact(
    tiny_sd, photos, tmp_path, capsys, disk_full_at, monkeypatch, straight
):
    out = tmp_path / "out"
    argv = train_args(tiny_sd, photos, out, max_train_steps=STEPS, checkpointing_steps=1)
    disk_full_at(f".checkpoint-2.tmp/{ti.CHECKPOINT_STATE}")

    assert ti.main(argv) == 2
    error = only_error_line(capsys)
    assert f"cannot write {out / 'checkpoint-2'}: no space left on device" in error
    assert "--resume_from_checkpoint latest" in error
    assert ti.read_checkpoint(out / "checkpoint-1")["state"]["step"] == 1
    assert leftovers(out) == [] and not (out / infer.LOCK_FILE).exists()

    monkeypatch.undo()  # space is freed
    assert ti.main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert torch.equal(learned(out), straight)


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB tmpfs, where this test may mount one (as root); else the test is skipped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, check=False, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_a_really_full_disk_stops_with_one_line_and_resume_finishes_bit_exact(
    tiny_sd, photos, small_disk, capsys, straight
):
    out = small_disk / "out"
    argv = train_args(tiny_sd, photos, out, max_train_steps=STEPS, checkpointing_steps=1, save_steps=1)
    assert ti.main(argv) == 2
    error = only_error_line(capsys)
    assert error.startswith(f"error: cannot write {out}") and "no space left on device" in error
    assert leftovers(out) == [] and not (out / infer.LOCK_FILE).exists()

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space is freed
    assert ti.main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert torch.equal(learned(out), straight)


def test_a_full_disk_while_logging_keeps_the_log_whole(tiny_sd, photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = infer.append_text

    def full_at_step_2(path, text):
        if json.loads(text)["step"] == 2:
            raise infer.write_error(path, no_space(path))
        return real(path, text)

    monkeypatch.setattr(infer, "append_text", full_at_step_2)
    assert ti.main(train_args(tiny_sd, photos, out, max_train_steps=STEPS, logging_steps=1)) == 2
    assert f"cannot write {out / 'metrics.jsonl'}: no space left on device" in only_error_line(capsys)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]


def test_every_file_the_trainer_writes_goes_through_the_atomic_writer(tiny_sd, photos, tmp_path, monkeypatch):
    written = set()
    real_write, real_append = infer.atomic_write, infer.append_text

    def atomic_write(path, write):
        written.add(Path(re.sub(r"\.(hub|checkpoint-\d+)\.tmp", r"\1", str(path))))  # the folder it becomes
        return real_write(path, write)

    def append_text(path, text):
        written.add(Path(path))
        return real_append(path, text)

    monkeypatch.setattr(infer, "atomic_write", atomic_write)
    monkeypatch.setattr(infer, "append_text", append_text)
    monkeypatch.setattr(ti, "hub_api", lambda token: SimpleNamespace(upload_folder=lambda **kw: None))
    monkeypatch.setattr(ti, "create_hub_repo", lambda args: "someone/concept")
    out = tmp_path / "out"
    validation = dict(validation_prompt="a <concept>", num_validation_images=1, validation_inference_steps=1)
    flags = dict(max_train_steps=2, save_steps=1, checkpointing_steps=1, **validation)
    train_once(train_args(tiny_sd, photos, out, "--push_to_hub", **flags))
    files = {p for p in out.rglob("*") if p.is_file()}
    assert out / "hub" / "README.md" in files and out / "loss.png" in files
    assert files == written


# Checkpoint integrity.


@pytest.fixture
def two_checkpoints(tiny_sd, photos, tmp_path) -> Path:
    """A 3-step run's folder as a kill after step 2 would have left its checkpoints: 1 and 2."""
    out = tmp_path / "out"
    train_once(train_args(tiny_sd, photos, out, max_train_steps=3, checkpointing_steps=1, logging_steps=1))
    shutil.rmtree(out / "checkpoint-3")
    return out


def test_latest_skips_a_truncated_checkpoint_with_a_warning_and_takes_the_previous_one(
    tiny_sd, photos, two_checkpoints, caplog
):
    out = two_checkpoints
    finished = learned(out)
    state = out / "checkpoint-2" / ti.CHECKPOINT_STATE
    state.write_bytes(state.read_bytes()[:100])
    with caplog.at_level(logging.INFO, "textual_inversion"):
        train_once(train_args(tiny_sd, photos, out, max_train_steps=3, resume_from_checkpoint="latest"))
    assert f"skipping {out / 'checkpoint-2'}, which is corrupt" in caplog.text
    assert "Resuming from" in caplog.text and "(step 1)" in caplog.text
    assert torch.equal(learned(out), finished)


def test_a_corrupt_checkpoint_named_explicitly_is_a_one_line_error(tiny_sd, photos, two_checkpoints, capsys):
    state = two_checkpoints / "checkpoint-2" / ti.CHECKPOINT_STATE
    state.write_bytes(b"not a checkpoint")
    argv = train_args(tiny_sd, photos, two_checkpoints, max_train_steps=3, resume_from_checkpoint="checkpoint-2")
    assert ti.main(argv) == 2
    assert "--resume_from_checkpoint checkpoint-2: " in only_error_line(capsys)


def test_a_checkpoint_without_its_optimizer_state_is_incomplete(tiny_sd, photos, two_checkpoints, capsys):
    state = two_checkpoints / "checkpoint-2" / ti.CHECKPOINT_STATE
    payload = torch.load(state, weights_only=True)
    del payload["optimizer"]
    torch.save(payload, state)
    argv = train_args(tiny_sd, photos, two_checkpoints, max_train_steps=3, resume_from_checkpoint="checkpoint-2")
    assert ti.main(argv) == 2
    assert "is incomplete: training_state.pt lacks optimizer" in only_error_line(capsys)


def test_resuming_an_sd_checkpoint_into_sdxl_names_both_families(tiny_sdxl, photos, two_checkpoints, capsys):
    argv = train_args(tiny_sdxl, photos, two_checkpoints, max_train_steps=3, resume_from_checkpoint="latest")
    assert ti.main(argv) == 2
    error = only_error_line(capsys)
    assert "trained on a Stable Diffusion 1.x/2.x model" in error and "is Stable Diffusion XL" in error


def test_resuming_with_another_vector_count_names_it(tiny_sd, photos, two_checkpoints, capsys):
    argv = train_args(tiny_sd, photos, two_checkpoints, num_vectors=2, resume_from_checkpoint="latest")
    assert ti.main(argv) == 2
    assert "it has 1 vector, --num_vectors is 2; use --num_vectors 1" in only_error_line(capsys)


def test_resuming_into_an_encoder_of_another_width_names_both_widths(tiny_sd, photos, two_checkpoints, capsys):
    state = two_checkpoints / "checkpoint-2" / ti.CHECKPOINT_STATE
    payload = torch.load(state, weights_only=True)
    payload["rows"] = [[torch.zeros(1, 48)]]  # as a model with 48-wide token embeddings records it
    torch.save(payload, state)
    argv = train_args(tiny_sd, photos, two_checkpoints, resume_from_checkpoint="latest")
    assert ti.main(argv) == 2
    assert "its text_encoder rows are 48 wide, but" in only_error_line(capsys)


def drop_the_family(out: Path) -> None:
    """checkpoint-2 as the trainer wrote it before checkpoints recorded the model family."""
    state = out / "checkpoint-2" / ti.CHECKPOINT_STATE
    payload = torch.load(state, weights_only=True)
    del payload["family"]
    torch.save(payload, state)


def test_a_checkpoint_that_records_no_family_resumes_to_the_same_result(tiny_sd, photos, two_checkpoints):
    finished = learned(two_checkpoints)
    drop_the_family(two_checkpoints)
    argv = train_args(tiny_sd, photos, two_checkpoints, max_train_steps=3, checkpointing_steps=1, logging_steps=1)
    train_once([*argv, "--resume_from_checkpoint", "latest"])
    assert torch.equal(learned(two_checkpoints), finished)


def test_a_checkpoint_that_records_no_family_is_refused_by_a_model_with_more_encoders(
    tiny_sdxl, photos, two_checkpoints, capsys
):
    drop_the_family(two_checkpoints)
    argv = train_args(tiny_sdxl, photos, two_checkpoints, max_train_steps=3, resume_from_checkpoint="latest")
    assert ti.main(argv) == 2
    assert "resume with the model it was trained on" in only_error_line(capsys)


def test_a_torn_last_line_of_the_metrics_is_dropped_on_resume(tiny_sd, photos, two_checkpoints):
    log = two_checkpoints / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')
    argv = train_args(tiny_sd, photos, two_checkpoints, max_train_steps=3, logging_steps=1)
    train_once([*argv, "--resume_from_checkpoint", "latest"])
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


# Time-based checkpoints.


def test_checkpointing_minutes_writes_checkpoints_between_checkpointing_steps(tiny_sd, photos, tmp_path):
    out = tmp_path / "out"
    train_once(train_args(tiny_sd, photos, out, max_train_steps=3, checkpointing_minutes=1e-9))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_checkpointing_minutes_zero_turns_them_off(tiny_sd, photos, tmp_path):
    out = tmp_path / "out"
    train_once(train_args(tiny_sd, photos, out, max_train_steps=3, checkpointing_minutes=0))
    assert not list(out.glob("checkpoint-*"))


# One run per output folder.


def write_lock(out: Path, pid: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lock = out / infer.LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00Z"}))
    return lock


def test_a_second_run_into_a_busy_folder_stops_at_once_naming_the_other(tiny_sd, photos, tmp_path, capsys):
    out = tmp_path / "out"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as other:
        try:
            lock = write_lock(out, other.pid)
            before = lock.read_bytes()
            assert ti.main(train_args(tiny_sd, photos, out)) == 2
            error = only_error_line(capsys)
        finally:
            other.kill()
    assert f"is in use by another run: process {other.pid} on {socket.gethostname()}" in error
    assert lock.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [infer.LOCK_FILE]


def test_a_stale_lock_is_taken_over_with_a_warning_and_released(tiny_sd, photos, tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    write_lock(out, gone.pid)
    with caplog.at_level(logging.WARNING, "infer"):
        train_once(train_args(tiny_sd, photos, out, max_train_steps=1))
    assert f"Taking over the lock of a run that is gone ({{'pid': {gone.pid}" in caplog.text
    assert (out / "learned_embeds.safetensors").exists() and not (out / infer.LOCK_FILE).exists()


def test_the_lock_is_released_when_a_run_fails(tiny_sd, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert ti.main(train_args(tiny_sd, photos, out, placeholder_token="toy")) == 2
    only_error_line(capsys)
    assert not out.exists()  # made only for the lock, so removed with it


# The Hub and the CPU.


def test_a_failing_upload_is_retried_then_one_line_with_the_files_kept(tiny_sd, photos, tmp_path, capsys, monkeypatch):
    attempts = []

    def upload_folder(**kwargs):
        attempts.append(kwargs["folder_path"])
        raise ConnectionError("503 Service Unavailable")

    monkeypatch.setattr(ti, "hub_api", lambda token: SimpleNamespace(upload_folder=upload_folder))
    monkeypatch.setattr(ti, "create_hub_repo", lambda args: "someone/concept")
    monkeypatch.setattr(ti, "HUB_RETRY_SECONDS", (0, 0))
    out = tmp_path / "out"
    assert ti.main(train_args(tiny_sd, photos, out, "--push_to_hub", max_train_steps=1)) == 2
    error = only_error_line(capsys)
    assert len(attempts) == 3
    assert "failed 3 times (503 Service Unavailable)" in error and f"hf upload someone/concept {out / 'hub'}" in error
    assert infer.read_embedding(out / "hub").token == "<concept>"


def test_ctrl_c_while_waiting_to_retry_the_upload_ends_the_wait(tiny_sd, photos, tmp_path, capsys, monkeypatch):
    attempts = []

    def upload_folder(**kwargs):
        attempts.append(kwargs["folder_path"])
        os.kill(os.getpid(), signal.SIGINT)  # the user gives up on a slow network
        raise ConnectionError("503 Service Unavailable")

    monkeypatch.setattr(ti, "hub_api", lambda token: SimpleNamespace(upload_folder=upload_folder))
    monkeypatch.setattr(ti, "create_hub_repo", lambda args: "someone/concept")
    monkeypatch.setattr(ti, "HUB_RETRY_SECONDS", (600, 600))
    out = tmp_path / "out"
    assert ti.main(train_args(tiny_sd, photos, out, "--push_to_hub", max_train_steps=1)) == 128 + signal.SIGINT
    assert len(attempts) == 1  # no second try after the wait: the stop cut it short
    error = only_error_line(capsys)
    assert "stopped by SIGINT while retrying the Hub upload" in error
    assert f"hf upload someone/concept {out / 'hub'}" in error


@pytest.mark.parametrize(("threads", "processes", "warned"), [(1, 1, True), (2, 1, False), (1, 4, False)])
def test_one_cpu_thread_with_cores_to_spare_is_said_with_the_fix(monkeypatch, caplog, threads, processes, warned):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=processes)
    with caplog.at_level(logging.WARNING, "textual_inversion"):
        ti.warn_if_one_cpu_thread(accelerator)
    assert ("accelerate launch --num_cpu_threads_per_process 4" in caplog.text) == warned


# How a stopping process takes a further signal (the process tests send real ones).


@pytest.fixture
def kills(monkeypatch) -> list:
    """A second Ctrl-C ends the process by re-raising the signal on itself: record it instead."""
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append(signum))
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)
    return sent


def stopping(first: int) -> ti.StopSignals:
    """A run in its training loop, where a first signal waits for the end of the step."""
    signals = ti.StopSignals()
    signals.outcome = None
    signals.handle(first, None)
    return signals


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_sigterm_during_a_stop_is_the_same_stop(kills, first):
    """accelerate 1.16+ and torchrun terminate their workers with SIGTERM on a stop of their own."""
    signals = stopping(first)
    signals.handle(signal.SIGTERM, None)
    assert kills == [] and signals.received == first


def test_a_second_ctrl_c_ends_the_process(kills):
    stopping(signal.SIGTERM).handle(signal.SIGINT, None)
    assert kills == [signal.SIGINT]


def test_a_signal_before_training_ends_the_run_at_once_with_its_status():
    with pytest.raises(ti.Stopped, match="stopped by SIGTERM before training started") as stopped:
        ti.StopSignals().handle(signal.SIGTERM, None)
    assert stopped.value.status == 128 + signal.SIGTERM
    assert not isinstance(stopped.value, Exception)  # no `except Exception` takes it for bad input
