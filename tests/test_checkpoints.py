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
    assert state["state"]["step"] == 2 and state["state"]["seed"] == 0 and state["tokens"] == ["<concept>"]
    # The optimizer holds the new rows and nothing else: one tensor, [N, D].
    assert list(state["optimizer"]["state"]) == [0]
    assert state["optimizer"]["state"][0]["exp_avg"].shape == (1, 32)


def test_resuming_gives_the_same_embedding_as_an_uninterrupted_run(tiny_sd, photos, tmp_path, run_trainer):
    flags = dict(max_train_steps=6, checkpointing_steps=3, lr_scheduler="cosine", lr_warmup_steps=2, repeats=2)
    straight = tmp_path / "straight"
    run_trainer(train_args(tiny_sd, photos, straight, **flags))
    resumed = tmp_path / "resumed"
    run_trainer(train_args(tiny_sd, photos, resumed, **{**flags, "max_train_steps": 3}))
    # The second half of the run keeps the first half's schedule (6 steps in total).
    (resumed / "learned_embeds.safetensors").unlink()
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


def test_no_step_runs_past_max_train_steps(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=3, checkpointing_steps=3))
    assert not (out / "checkpoint-3").exists()  # the final files cover the last step
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=4, checkpointing_steps=2))
    before = learned(out)
    result = run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, resume_from_checkpoint="checkpoint-2"))
    assert result.steps == 2  # already at the last step: nothing more is trained
    assert not torch.equal(learned(out), before)  # the run ended with checkpoint-2's rows


def test_checkpoints_total_limit_keeps_the_newest(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=6, checkpointing_steps=1, checkpoints_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


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
    calls = []
    real = ti.accumulate_gradients

    def ctrl_c_during_third_step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(ti, "accumulate_gradients", ctrl_c_during_third_step)
    out = tmp_path / "out"
    with pytest.raises(ti.Stopped, match="stopped by SIGINT at step 3.*resume_from_checkpoint latest") as stopped:
        run_trainer(train_args(tiny_sd, photos, out, max_train_steps=5))
    assert stopped.value.status == 128 + signal.SIGINT
    assert (out / "checkpoint-3" / ti.CHECKPOINT_STATE).exists()
