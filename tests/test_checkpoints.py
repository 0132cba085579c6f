"""Checkpoints: small, exact, pruned, resumable, and written when a run is interrupted."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

import textual_inversion as ti


def learned(out):
    return load_file(out / "learned_embeds.safetensors")["<concept>"]


def test_a_checkpoint_holds_the_run_state_in_kilobytes(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=3, checkpointing_steps=2))
    folder = out / "checkpoint-2"
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 20_000
    state = torch.load(folder / ti.CHECKPOINT_STATE, weights_only=True)
    assert state["state"]["step"] == 2 and state["state"]["seed"] == 0 and state["tokens"] == [["<concept>"]]
    # The optimizer holds the new rows and nothing else: one tensor, [N, D].
    assert list(state["optimizer"]["state"]) == [0]
    assert state["optimizer"]["state"][0]["exp_avg"].shape == (1, 32)


def stop_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C during the given step of the next run in this process."""
    calls, real = [], ti.accumulate_gradients

    def ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(ti, "accumulate_gradients", ctrl_c)


def test_resuming_gives_the_same_embedding_as_an_uninterrupted_run(tiny_sd, photos, tmp_path, run_trainer, monkeypatch):
    flags = dict(max_train_steps=6, lr_scheduler="cosine", lr_warmup_steps=2, repeats=2)
    straight = tmp_path / "straight"
    run_trainer(train_args(tiny_sd, photos, straight, **flags))
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)  # the first half of the same 6-step schedule
        with pytest.raises(ti.Stopped):
            run_trainer(train_args(tiny_sd, photos, resumed, **flags))
    run_trainer(train_args(tiny_sd, photos, resumed, resume_from_checkpoint="latest", **flags))
    assert torch.equal(learned(resumed), learned(straight))


def test_resume_accepts_a_path_or_a_name_inside_output_dir(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, checkpointing_steps=1))
    for where in (str(out / "checkpoint-1"), "checkpoint-1"):
        result = run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, resume_from_checkpoint=where))
        assert result.steps == 2


def test_resume_latest_without_checkpoints_starts_from_step_zero(tiny_sd, photos, tmp_path, run_trainer):
    result = run_trainer(
        train_args(tiny_sd, photos, tmp_path / "out", max_train_steps=2, resume_from_checkpoint="latest")
    )
    assert result.steps == 2


def test_the_last_step_is_checkpointed_and_saved_when_it_falls_on_the_cadence(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=4, checkpointing_steps=2, save_steps=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in out.glob("learned_embeds-steps-*")) == [
        "learned_embeds-steps-2.safetensors",
        "learned_embeds-steps-4.safetensors",
    ]
    assert torch.equal(learned(out / "checkpoint-4"), learned(out))


def test_a_finished_run_continues_from_its_last_step_with_a_higher_limit(tiny_sd, photos, tmp_path, run_trainer):
    straight, out = tmp_path / "straight", tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, straight, max_train_steps=6, checkpointing_steps=3))
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=3, checkpointing_steps=3))
    result = run_trainer(
        train_args(tiny_sd, photos, out, max_train_steps=6, checkpointing_steps=3, resume_from_checkpoint="latest")
    )
    assert (result.first_step, result.steps) == (3, 6)
    assert torch.equal(learned(out), learned(straight))


def test_the_done_line_counts_the_steps_this_run_trained(tiny_sd, photos, tmp_path, run_trainer, caplog):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, checkpointing_steps=2))
    with caplog.at_level("INFO", "textual_inversion"):
        run_trainer(train_args(tiny_sd, photos, out, max_train_steps=5, resume_from_checkpoint="latest"))
    assert "Done: steps 3-5 (3 steps, resumed at 2) in" in caplog.text
    assert "the run is at step 5" in caplog.text


def test_no_step_runs_past_max_train_steps(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=4, checkpointing_steps=2))
    before = learned(out)
    result = run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, resume_from_checkpoint="checkpoint-2"))
    assert result.steps == 2  # already at the last step: nothing more is trained
    assert not torch.equal(learned(out), before)  # the run ended with checkpoint-2's rows


def test_checkpoints_total_limit_keeps_the_newest(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=6, checkpointing_steps=1, checkpoints_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_a_checkpoint_folder_loads_like_an_output_folder(tiny_sd, photos, tmp_path, run_trainer):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=3, checkpointing_steps=2))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_textual_inversion(out / "checkpoint-2")
    assert "<concept>" in pipe.tokenizer.get_vocab()


def test_ctrl_c_ends_the_step_and_saves_a_checkpoint_to_resume_from(
    tiny_sd, photos, tmp_path, run_trainer, monkeypatch
):
    stop_at_step(monkeypatch, 3)
    out = tmp_path / "out"
    with pytest.raises(ti.Stopped, match="stopped by SIGINT at step 3.*resume_from_checkpoint latest") as stopped:
        run_trainer(train_args(tiny_sd, photos, out, max_train_steps=5))
    assert stopped.value.status == 128 + signal.SIGINT
    assert (out / "checkpoint-3" / ti.CHECKPOINT_STATE).exists()


def test_a_stopped_run_finishes_its_trackers(tiny_sd, photos, tmp_path, run_trainer, monkeypatch):
    from accelerate import Accelerator

    finished = []

    def end_training(accelerator):
        finished.append(accelerator)

    monkeypatch.setattr(Accelerator, "end_training", end_training)
    stop_at_step(monkeypatch, 2)
    with pytest.raises(ti.Stopped):
        run_trainer(train_args(tiny_sd, photos, tmp_path / "out", max_train_steps=4))
    assert len(finished) == 1


def test_ctrl_c_during_validation_images_drops_them_and_checkpoints_at_once(
    tiny_sd, photos, tmp_path, run_trainer, monkeypatch
):
    real, denoised = ti.validation_pipeline, []

    def pipeline_that_gets_ctrl_c(models):
        pipe = real(models)
        step = pipe.scheduler.step

        def step_then_ctrl_c(*args, **kwargs):
            denoised.append(1)
            if len(denoised) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return step(*args, **kwargs)

        pipe.scheduler.step = step_then_ctrl_c
        return pipe

    monkeypatch.setattr(ti, "validation_pipeline", pipeline_that_gets_ctrl_c)
    out = tmp_path / "out"
    flags = dict(validation_prompt="a <concept>", validation_steps=2, validation_inference_steps=20)
    with pytest.raises(ti.Stopped, match="stopped by SIGINT at step 2"):
        run_trainer(train_args(tiny_sd, photos, out, max_train_steps=6, num_validation_images=1, **flags))
    assert len(denoised) == 2  # the images stopped at the denoising step the signal came in
    assert not (out / "validation" / "step-2.png").exists()
    assert (out / "checkpoint-2" / ti.CHECKPOINT_STATE).exists()


def test_a_signal_during_the_last_step_lets_the_run_finish_normally(
    tiny_sd, photos, tmp_path, run_trainer, monkeypatch
):
    stop_at_step(monkeypatch, 3)
    out = tmp_path / "out"
    result = run_trainer(train_args(tiny_sd, photos, out, max_train_steps=3))
    assert result.steps == 3
    assert (out / "learned_embeds.safetensors").exists() and not list(out.glob("checkpoint-*"))
