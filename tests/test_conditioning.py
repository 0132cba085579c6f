"""--clip_skip: training, the validation loss, validation images and infer.py condition on the CLIP
layer that diffusers' pipelines use for the same clip_skip, and every output says which."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import RESOLUTION, plan_for, train_args, train_once
from PIL import Image
from test_errors import fails_cleanly
from test_watch import RecordingHub, hub_run

import infer
import textual_inversion as ti

PROMPT = "a photo of a <concept>"


@pytest.fixture(scope="module")
def trained_sd(tiny_sd, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_skip_sd") / "out"
    train_once(train_args(tiny_sd, photos, out, num_vectors=2, max_train_steps=2, clip_skip=1))
    return out


@pytest.fixture(scope="module")
def trained_sdxl(tiny_sdxl, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_skip_sdxl") / "out"
    train_once(train_args(tiny_sdxl, photos, out, num_vectors=2, max_train_steps=2, clip_skip=1))
    return out


def trainer_conditioning(model, photos, trained, tmp_path, clip_skip: int):
    """The hidden states (and SDXL's added conditioning) the training loss computes for PROMPT,
    with the trained rows, through the trainer's own stages."""
    argv = train_args(model, photos, tmp_path / "out", initializer_token=None, clip_skip=clip_skip)
    args = ti.parse_args([*argv, "--initializer_embedding", str(trained)])
    embedding = ti.read_initializer_embedding(args)
    models = ti.load_models(args, torch.device("cpu"), torch.float32)
    placeholders = ti.add_placeholder_tokens(
        models, plan_for(args, initializer=embedding).concepts[0].tokens, embedding
    )
    prompt = PROMPT.replace("<concept>", " ".join(placeholders.tokens))
    ids = [tok([prompt], padding="max_length", return_tensors="pt").input_ids for tok in models.tokenizers]
    time_ids = models.family.time_ids((RESOLUTION, RESOLUTION), (0, 0), (RESOLUTION, RESOLUTION))
    time_ids = None if time_ids is None else torch.tensor([time_ids], dtype=torch.float32)
    with torch.no_grad():
        return models.family.condition(models.text_encoders, ids, time_ids, models.clip_skip)


def test_sd_conditioning_equals_encode_prompt_with_the_same_clip_skip(tiny_sd, photos, trained_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    hidden, _ = trainer_conditioning(tiny_sd, photos, trained_sd, tmp_path, clip_skip=1)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(trained_sd)
    infer.enable_clip_skip(pipe)  # diffusers' SD clip_skip needs it with transformers >= 5.6
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=1)
        last_layer, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    # Equal to float32 rounding: the trainer's weights sit in their own memory, diffusers' are
    # mapped from the file, and CPU kernels round by alignment. A wrong layer differs by O(1).
    torch.testing.assert_close(hidden, expected)
    assert not torch.allclose(hidden, last_layer)


def test_sdxl_conditioning_equals_encode_prompt_with_the_same_clip_skip(tiny_sdxl, photos, trained_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    hidden, added = trainer_conditioning(tiny_sdxl, photos, trained_sdxl, tmp_path, clip_skip=1)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    for weights, encoder, tokenizer in (
        ("learned_embeds.safetensors", pipe.text_encoder, pipe.tokenizer),
        ("learned_embeds_2.safetensors", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        pipe.load_textual_inversion(trained_sdxl, weight_name=weights, text_encoder=encoder, tokenizer=tokenizer)
    with torch.no_grad():
        expected, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, clip_skip=1)
        penultimate, _, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, expected)  # to float32 rounding, as for SD above
    torch.testing.assert_close(added["text_embeds"], pooled)
    assert not torch.allclose(hidden, penultimate)


def test_clip_skip_beyond_the_encoders_layers_is_refused(tiny_sd, photos, tmp_path, capsys):
    argv = train_args(tiny_sd, photos, tmp_path / "out", clip_skip=5)
    fails_cleanly(capsys, argv, "--clip_skip 5: the text encoder has 5 layers; use at most 4")
    assert not (tmp_path / "out").exists()


def test_validation_images_are_generated_with_the_clip_skip(tiny_sd, photos, tmp_path, run_trainer):
    """The grid a run writes is what diffusers' pipeline makes with the trained embedding and
    the same clip_skip (and not what it makes without)."""
    out = tmp_path / "out"
    flags = dict(max_train_steps=1, validation_prompt="a <concept>", num_validation_images=1)
    run_trainer(train_args(tiny_sd, photos, out, clip_skip=2, validation_inference_steps=2, **flags))
    grid = np.asarray(infer.grid_tiles(out / "validation" / "step-1.png")[0][0])

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(out)
    infer.enable_clip_skip(pipe)
    made = [ti.validation_images(pipe, ["a <concept>"], 1, 0, RESOLUTION, 2, clip_skip)[0][0] for clip_skip in (2, 0)]
    assert np.abs(grid.astype(int) - np.asarray(made[0]).astype(int)).max() <= 1
    assert not np.array_equal(np.asarray(made[0]), np.asarray(made[1]))


def test_model_card_says_to_generate_with_the_clip_skip(tiny_sd, photos, tmp_path, run_trainer, monkeypatch):
    monkeypatch.setattr(ti, "hub_api", RecordingHub())
    out = tmp_path / "out"
    hub_run(run_trainer, tiny_sd, photos, out, clip_skip=1)
    card = (out / "hub" / "README.md").read_text()
    assert "| clip skip | 1 (generate with clip_skip=1) |" in card
    assert 'image = pipe("a <concept> on the beach", clip_skip=1).images[0]' in card
    assert '--prompt "a <concept> on the beach" --clip_skip 1' in card


def test_infer_generates_with_the_clip_skip_and_records_it(tiny_sd, trained_sd, tmp_path):
    argv = ["--model", tiny_sd, "--embedding", trained_sd, "--prompt", "a <concept>", "--out", tmp_path]
    argv += ["--steps", 2, "--height", RESOLUTION, "--width", RESOLUTION, "--seed", 3, "--clip_skip", 1]
    assert infer.main([str(a) for a in argv]) == 0
    png = Image.open(tmp_path / "00000-3.png")
    assert infer.read_png_settings(tmp_path / "00000-3.png")["clip_skip"] == 1
    assert ", Clip skip: 2, " in png.text["parameters"]  # A1111 counts from 1

    pipe = infer.load_pipeline(str(tiny_sd))
    infer.set_scheduler(pipe, "dpm++")
    infer.load_embedding(pipe, trained_sd)
    infer.enable_clip_skip(pipe)
    made = {
        clip_skip: pipe(
            "a <concept>",
            num_inference_steps=2,
            height=RESOLUTION,
            width=RESOLUTION,
            generator=torch.Generator("cpu").manual_seed(3),
            clip_skip=clip_skip,
        ).images[0]
        for clip_skip in (1, None)
    }
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(made[1]))
    assert not np.array_equal(np.asarray(made[1]), np.asarray(made[None]))
