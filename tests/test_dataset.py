"""Datasets as people have them: captions, template files, masks, aspect buckets, dataset.jsonl."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_photo, plan_for, train_args
from PIL import Image
from safetensors.torch import load_file

import textual_inversion as ti

BUCKETS = dict(aspect_buckets=True, bucket_step=16)  # at 64 px: 32x128 ... 64x64 ... 128x32


def dataset(data: Path, tmp_path: Path, **flags) -> ti.TextualInversionDataset:
    args = ti.parse_args(train_args("model", data, tmp_path / "out", **flags))
    plan = plan_for(args)
    return ti.dataset_from_args(plan.concepts[0], plan)


def stages(model: Path, data: Path, tmp_path: Path, **flags):
    """(models, placeholders, concept) through the trainer's own stages, as run() calls them."""
    args = ti.parse_args(train_args(model, data, tmp_path / "out", **flags))
    plan = plan_for(args)
    images = ti.dataset_from_args(plan.concepts[0], plan)
    models = ti.load_models(args, torch.device("cpu"), torch.float32)
    placeholders = ti.add_placeholder_tokens(models, plan.concepts[0].tokens, "toy")
    concept = ti.encode_photos(
        ti.decode_images(images, 0),
        images.photo_prompts,
        models,
        placeholders,
        unmasked_weight=args.unmasked_weight,
        sources=images.prompt_sources,
    )
    return models, placeholders, concept


def save_mask(path: Path, size: tuple[int, int], white: tuple[int, int, int, int]) -> Path:
    mask = Image.new("L", size, 0)
    mask.paste(255, white)
    mask.save(path)
    return path


def people_dataset(folder: Path) -> Path:
    """A wide photo with a caption and a mask, a tall one with a caption lacking the word and a
    mask, a square one with neither."""
    make_photo(folder / "wide.png", (120, 60), 1)
    make_photo(folder / "tall.png", (60, 120), 2)
    make_photo(folder / "square.png", (72, 72), 3)
    (folder / "wide.txt").write_text("a [name] on the grass")
    (folder / "tall.txt").write_text("red toy")
    save_mask(folder / "wide-masklabel.png", (120, 60), (10, 10, 70, 50))
    save_mask(folder / "tall-masklabel.png", (60, 120), (10, 40, 50, 110))
    return folder


PEOPLE = dict(caption_extension=".txt", masked_loss=True, **BUCKETS)


# ----------------------------------------------------------------------------------------
# Captions.


def test_a_caption_is_its_photos_prompt_with_all_vector_tokens_where_name_is(tmp_path):
    make_photo(tmp_path / "a.png")
    make_photo(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a [name] on the grass")
    (tmp_path / "b.txt").write_text("<concept> in the snow")
    data = dataset(tmp_path, tmp_path, caption_extension=".txt", num_vectors=2)
    assert data.photo_prompts == [
        ["a <concept> <concept>_1 on the grass"],
        ["<concept> <concept>_1 in the snow"],
    ]


def test_a_caption_without_the_word_gets_it_in_front_with_one_summary_line(tmp_path, caplog):
    for name in ("a", "b"):
        make_photo(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text("red toy on grass\n")
    with caplog.at_level(logging.INFO, logger="textual_inversion"):
        data = dataset(tmp_path, tmp_path, caption_extension="txt")
    assert data.photo_prompts[0] == ["<concept>, red toy on grass"]
    lines = [r.getMessage() for r in caplog.records if "in front" in r.getMessage()]
    assert lines == ["2 captions had no [name] or <concept>; the new word was put in front of them"]


def test_photos_without_a_caption_or_with_a_blank_one_use_the_templates_with_one_warning(tmp_path, caplog):
    for name in ("a", "b", "c"):
        make_photo(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a [name] toy")
    (tmp_path / "b.txt").write_text("  \n")
    with caplog.at_level(logging.WARNING, logger="textual_inversion"):
        data = dataset(tmp_path, tmp_path, caption_extension=".txt")
    templates = [t.replace("{}", "<concept>") for t in ti.read_templates("object")]
    assert data.photo_prompts == [["a <concept> toy"], templates, templates]
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 3 photos have no caption (.txt file) or a blank one; they use the templates"
    ]


def test_caption_files_are_not_skipped_as_non_images(tmp_path, caplog):
    make_photo(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("[name]")
    with caplog.at_level(logging.WARNING, logger="textual_inversion"):
        dataset(tmp_path, tmp_path, caption_extension=".caption")
    assert not caplog.records


def test_a_caption_may_start_with_a_utf8_bom(tmp_path):
    make_photo(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa [name] café".encode())
    assert dataset(tmp_path, tmp_path, caption_extension=".txt").photo_prompts == [["a <concept> café"]]


def test_a_caption_in_another_encoding_is_a_one_line_error_naming_it(tmp_path):
    make_photo(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("a [name] café".encode("latin-1"))
    with pytest.raises(ti.UserError, match=r"a\.txt: not UTF-8 text") as error:
        dataset(tmp_path, tmp_path, caption_extension=".txt")
    assert "\n" not in str(error.value)


def test_a_caption_longer_than_77_tokens_is_cut_with_a_warning_naming_it(tiny_sd, tmp_path, caplog):
    make_photo(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("a [name] " + "on the grass " * 40)
    with caplog.at_level(logging.WARNING, logger="textual_inversion"):
        _, _, concept = stages(tiny_sd, tmp_path / "data", tmp_path, caption_extension=".txt")
    assert concept.prompt_ids[0].shape == (1, 77)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "a.txt" in warned[0] and "more than the tokenizer's 77" in warned[0]


def test_a_cut_that_removes_the_new_word_is_an_error_naming_the_caption_file(tiny_sd, tmp_path):
    make_photo(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("on the grass " * 40 + "a [name]")
    with pytest.raises(ti.UserError, match=r"a\.txt: \d+ tokens, more than the tokenizer's 77, and the cut"):
        stages(tiny_sd, tmp_path / "data", tmp_path, caption_extension=".txt")


def test_a_caption_may_use_the_word_twice_and_each_gets_all_vector_tokens(tiny_sd, tmp_path, run_trainer):
    make_photo(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("a <concept> next to another [name]")
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, tmp_path / "data", out, caption_extension=".txt", num_vectors=2))
    [record] = [json.loads(line) for line in (out / "dataset.jsonl").read_text().splitlines()]
    assert record["prompts"] == ["a <concept> <concept>_1 next to another <concept> <concept>_1"]
    assert (out / "learned_embeds.safetensors").exists()


def test_every_occurrence_of_the_word_is_two_whole_runs_of_its_token_ids(tiny_sd, tmp_path):
    make_photo(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("[name] and [name]")
    _, placeholders, concept = stages(tiny_sd, tmp_path / "data", tmp_path, caption_extension=".txt")
    ids = concept.prompt_ids[0][0].tolist()
    assert ids.count(placeholders.ids[0][0]) == 2
    assert ti.word_occurrences(ids, placeholders.ids[0]) == (2, True)


def test_a_vector_token_standing_without_the_word_is_still_refused(tiny_sd, tmp_path):
    make_photo(tmp_path / "data" / "a.png")
    models, placeholders, _ = stages(tiny_sd, tmp_path / "data", tmp_path, num_vectors=2)
    tokenizer, ids = models.tokenizers[0], placeholders.ids[0]
    assert ti.word_occurrences([1, *ids, 2, *ids], ids) == (2, True)
    assert ti.word_occurrences([1, ids[1], 2], ids) == (0, False)
    with pytest.raises(ti.UserError, match="does not tokenize as its own new token"):
        ti.tokenize_prompts(["a <concept>_1 alone"], tokenizer, {"<concept>": ids}, {})


# ----------------------------------------------------------------------------------------
# Template files (A1111).


def test_a_template_file_replaces_the_templates_with_name_or_braces(tmp_path):
    make_photo(tmp_path / "a.png")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of [name]\nno word here\n\na drawing of {}\n")
    data = dataset(tmp_path, tmp_path, template_file=templates)
    assert data.photo_prompts == [["a photo of <concept>", "a drawing of <concept>"]]


def test_filewords_take_the_caption_else_the_words_of_the_file_name(tmp_path):
    make_photo(tmp_path / "00012-red_toy-on-grass.png")
    make_photo(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("red toy on grass")
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of [name], [filewords]\n")
    data = dataset(tmp_path, tmp_path, template_file=templates, caption_extension=".txt")
    assert data.photo_prompts == [["a photo of <concept>, red toy on grass"]] * 2


def test_filewords_over_a_caption_holding_the_word_give_it_all_its_vector_tokens(tmp_path):
    make_photo(tmp_path / "a.png")
    make_photo(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("<concept> on a wooden table")
    (tmp_path / "b.txt").write_text("a [name] on grass")
    templates = tmp_path / "subject_filewords.txt"
    templates.write_text("a photo of a [name], [filewords]\n")
    data = dataset(tmp_path, tmp_path, template_file=templates, caption_extension=".txt", num_vectors=2)
    word = "<concept> <concept>_1"
    assert data.photo_prompts == [
        [f"a photo of a {word}, {word} on a wooden table"],
        [f"a photo of a {word}, a {word} on grass"],
    ]


@pytest.mark.parametrize(
    ("template", "prompt"),
    [
        ("a photo of [name], [filewords]", "a photo of <concept>"),
        ("[filewords], a photo of [name]", "a photo of <concept>"),
        ("a [name] [filewords] style", "a <concept> style"),
    ],
    ids=["after", "before", "inside"],
)
def test_empty_filewords_leave_no_dangling_separator(tmp_path, template, prompt):
    make_photo(tmp_path / "0001.png")  # no caption, and no words in its file name
    templates = tmp_path / "t.txt"
    templates.write_text(template + "\n")
    assert dataset(tmp_path, tmp_path, template_file=templates).photo_prompts == [[prompt]]


@pytest.mark.parametrize(
    ("text", "error"),
    [(None, "no such file"), ("a photo of a toy\n[filewords]\n", r"no line contains \[name\]")],
    ids=["missing", "no-word"],
)
def test_a_template_file_that_is_missing_or_lacks_the_word_is_an_error(tmp_path, text, error):
    make_photo(tmp_path / "a.png")
    templates = tmp_path / "t.txt"
    if text is not None:
        templates.write_text(text)
    with pytest.raises(ti.UserError, match=f"--template_file .*t.txt: {error}"):
        dataset(tmp_path, tmp_path, template_file=templates)


# ----------------------------------------------------------------------------------------
# Masks.


def test_masks_are_read_beside_the_photo_or_from_mask_dir_and_are_not_photos(tmp_path):
    make_photo(tmp_path / "a.png", (64, 64))
    save_mask(tmp_path / "a-masklabel.png", (64, 64), (0, 0, 32, 64))
    assert dataset(tmp_path, tmp_path, masked_loss=True).mask_paths == [tmp_path / "a-masklabel.png"]
    masks = tmp_path / "masks"
    masks.mkdir()
    save_mask(masks / "a.jpg", (64, 64), (0, 0, 32, 64))
    assert dataset(tmp_path, tmp_path, masked_loss=True, mask_dir=masks).mask_paths == [masks / "a.jpg"]


def test_a_photo_without_a_mask_counts_fully_with_one_warning(tiny_sd, tmp_path, caplog):
    make_photo(tmp_path / "data" / "a.png", (64, 64))
    make_photo(tmp_path / "data" / "b.png", (64, 64))
    save_mask(tmp_path / "data" / "a-masklabel.png", (64, 64), (0, 0, 32, 64))
    with caplog.at_level(logging.WARNING, logger="textual_inversion"):
        _, _, concept = stages(tiny_sd, tmp_path / "data", tmp_path, masked_loss=True)
    assert [r.getMessage() for r in caplog.records] == ["1 of 2 photos has no mask; it counts fully"]
    assert torch.equal(concept.loss_weight[1], torch.ones_like(concept.loss_weight[1]))


def test_a_mask_becomes_a_loss_weight_per_latent_pixel_averaging_one(tiny_sd, tmp_path):
    make_photo(tmp_path / "data" / "a.png", (64, 64))
    save_mask(tmp_path / "data" / "a-masklabel.png", (64, 64), (0, 0, 28, 64))  # 3.5 of 8 latent columns
    _, _, concept = stages(tiny_sd, tmp_path / "data", tmp_path, masked_loss=True, unmasked_weight=0.2)
    coverage = torch.tensor([1, 1, 1, 0.5, 0, 0, 0, 0])
    weight = 0.2 + 0.8 * coverage
    weight = weight / weight.mean()
    as_is, mirrored = concept.loss_weight[0, :, 0]
    torch.testing.assert_close(as_is, weight.expand(8, 8))
    torch.testing.assert_close(mirrored, weight.flip(0).expand(8, 8))


def zero_prediction(monkeypatch, models) -> None:
    """The UNet predicts 0: an epsilon loss is then the (weighted) mean of noise squared."""

    class Zero:
        def __call__(self, sample, *args, **kwargs):
            return type("Out", (), {"sample": torch.zeros_like(sample)})

    monkeypatch.setattr(models, "unet_forward", Zero())


def test_the_loss_is_the_mask_weighted_mean_of_the_squared_error(tiny_sd, tmp_path, monkeypatch):
    make_photo(tmp_path / "data" / "a.png", (64, 64))
    save_mask(tmp_path / "data" / "a-masklabel.png", (64, 64), (0, 0, 32, 64))
    models, _, concept = stages(tiny_sd, tmp_path / "data", tmp_path, masked_loss=True)
    zero_prediction(monkeypatch, models)
    batch = ti.draw_batch(torch.Generator().manual_seed(0), torch.zeros(4, dtype=torch.long), concept, 1000)
    weight = concept.loss_weight[batch.image, batch.flip]
    expected = (batch.noise**2 * weight).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ti.denoising_loss(models, concept, batch), expected)
    assert not torch.allclose(expected, (batch.noise**2).mean(dim=(1, 2, 3)))


def test_the_validation_loss_is_weighted_by_the_same_masks(tiny_sd, tmp_path, monkeypatch):
    people_dataset(tmp_path / "data")
    models, _, concept = stages(tiny_sd, tmp_path / "data", tmp_path, **PEOPLE)
    zero_prediction(monkeypatch, models)
    batch = ti.validation_batch(0, concept, 1000)
    expected = []
    for i in range(len(batch)):
        height, width = concept.bucket_sizes[concept.bucket_of[batch.image[i]]]
        noise = batch.noise[i, :, :height, :width]
        weight = concept.loss_weight[batch.image[i], batch.flip[i], :, :height, :width]
        expected.append(float((noise**2 * weight).mean()))
    assert ti.validation_loss(models, concept, batch, chunk=3) == [pytest.approx(np.mean(expected), rel=1e-5)]


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: save_mask(p, (64, 64), (0, 0, 0, 0)), "all black"),
        (lambda p: save_mask(p, (64, 48), (0, 0, 32, 48)), "64x48 does not have its photo's aspect ratio"),
        (lambda p: p.write_text("not a picture"), "not an image"),
    ],
    ids=["black", "aspect", "not-image"],
)
def test_a_bad_mask_is_a_one_line_error_naming_it(tiny_sd, tmp_path, make, error):
    make_photo(tmp_path / "data" / "a.png", (64, 64))
    make(tmp_path / "data" / "a-masklabel.png")
    argv = train_args(tiny_sd, tmp_path / "data", tmp_path / "out", masked_loss=True)
    with pytest.raises(ti.UserError, match=f"mask .*a-masklabel.png: {error}") as raised:
        ti.run_training(ti.parse_args(argv))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_the_mask_follows_the_photos_crop_bucket_and_flip(tmp_path):
    photo = Image.new("RGB", (120, 60), (0, 0, 255))
    photo.paste((255, 0, 0), (12, 0, 40, 60))  # a red band, left of centre
    photo.save(tmp_path / "a.png")
    save_mask(tmp_path / "a-masklabel.png", (120, 60), (12, 0, 40, 60))
    example = dataset(tmp_path, tmp_path, masked_loss=True, **BUCKETS)[0]
    assert example["target_size"] == (48, 80)  # aspect 2 -> the 80x48 bucket; 10 px cut each side
    red, blue = example["pixel_values"][:, 0] > 0.9, example["pixel_values"][:, 0] < -0.9  # [2 views, h, w]
    subject = example["mask"][:, 0]
    assert red.any() and not torch.equal(red[0], red[1]) and (red | blue).float().mean() > 0.9
    assert (subject[red] > 0.9).all() and (subject[blue] < 0.1).all()


# ----------------------------------------------------------------------------------------
# Aspect buckets.


def test_buckets_have_sides_in_steps_within_limits_and_at_most_the_area():
    sizes = ti.bucket_sizes(512, 64, 256, 1024)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256 and max(w, h) <= 1024 and w * h <= 512 * 512


def test_each_photo_gets_the_bucket_nearest_its_aspect_ratio(tmp_path):
    people_dataset(tmp_path)
    examples = ti.decode_images(dataset(tmp_path, tmp_path, **BUCKETS), 0)
    assert [e["target_size"] for e in examples] == [(64, 64), (80, 48), (48, 80)]  # square, tall, wide (h, w)
    assert [tuple(e["pixel_values"].shape[2:]) for e in examples] == [(64, 64), (80, 48), (48, 80)]


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (
            dict(min_bucket_resolution=128, max_bucket_resolution=64),
            "--min_bucket_resolution 128 is more than --max_bucket_resolution 64",
        ),
        (dict(bucket_step=12), "--bucket_step 12 must be a multiple of the VAE's downscaling factor 8"),
    ],
    ids=["min-over-max", "step"],
)
def test_inconsistent_bucket_flags_are_one_line_errors(tiny_sd, photos, tmp_path, flags, error, capsys):
    argv = train_args(tiny_sd, photos, tmp_path / "out", aspect_buckets=True, **flags)
    assert ti.main([str(a) for a in argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {error}"]


def test_sdxl_time_ids_hold_the_true_size_crop_and_bucket(tiny_sdxl, tmp_path):
    make_photo(tmp_path / "data" / "wide.png", (120, 60))
    _, _, concept = stages(tiny_sdxl, tmp_path / "data", tmp_path, **BUCKETS)
    # 120x60 fills the 80x48 bucket from its middle 100x60: 10 px cut on the left, 8 px once resized.
    assert concept.time_ids.tolist() == [[60, 120, 0, 8, 48, 80]]


def test_with_buckets_each_step_is_one_unet_call_of_one_bucket(tiny_sd, tmp_path, run_trainer, monkeypatch):
    from diffusers import UNet2DConditionModel

    people_dataset(tmp_path / "data")
    shapes = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, *args, **kwargs):
        if torch.is_grad_enabled():  # training, not the validation loss
            shapes.append(tuple(sample.shape))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    run_trainer(train_args(tiny_sd, tmp_path / "data", tmp_path / "out", max_train_steps=8, **BUCKETS))
    assert len(shapes) == 8  # train_batch_size 1 x accumulation 2, in one call per step
    assert {s[0] for s in shapes} == {2}
    assert {s[2:] for s in shapes} == {(8, 8), (10, 6), (6, 10)}  # all three buckets drawn


# ----------------------------------------------------------------------------------------
# What the trainer sees, and exactness.


def test_dataset_jsonl_and_the_summary_line_show_what_the_trainer_sees(tiny_sd, tmp_path, run_trainer, caplog):
    data = people_dataset(tmp_path / "data")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="textual_inversion"):
        run_trainer(train_args(tiny_sd, data, out, max_train_steps=1, **PEOPLE))
    records = [json.loads(line) for line in (out / "dataset.jsonl").read_text().splitlines()]
    assert records[0] == {
        "file": str(data / "square.png"),
        "size": [72, 72],
        "bucket": [64, 64],
        "caption": None,
        "mask": None,
        "prompts": [t.replace("{}", "<concept>") for t in ti.read_templates("object")],
    }
    assert records[1]["caption"] == "red toy" and records[1]["prompts"] == ["<concept>, red toy"]
    assert records[1]["size"] == [60, 120] and records[1]["bucket"] == [48, 80]
    assert records[2]["mask"] == str(data / "wide-masklabel.png") and records[2]["prompts"] == [
        "a <concept> on the grass"
    ]
    assert any("3 photos (2 captioned, 2 masked, 3 buckets)" in r.getMessage() for r in caplog.records)


def learned(out: Path) -> torch.Tensor:
    return load_file(out / "learned_embeds.safetensors")["<concept>"]


def test_resuming_is_exact_with_captions_masks_and_buckets(tiny_sd, tmp_path, run_trainer):
    data = people_dataset(tmp_path / "data")
    flags = dict(max_train_steps=6, checkpointing_steps=3, repeats=2, **PEOPLE)
    straight = tmp_path / "straight"
    run_trainer(train_args(tiny_sd, data, straight, **flags))
    resumed = tmp_path / "resumed"
    run_trainer(train_args(tiny_sd, data, resumed, **{**flags, "max_train_steps": 3}))
    (resumed / "learned_embeds.safetensors").unlink()
    run_trainer(train_args(tiny_sd, data, resumed, resume_from_checkpoint="latest", **flags))
    assert torch.equal(learned(resumed), learned(straight))


@pytest.mark.slow  # two processes under accelerate's launcher
def test_two_processes_train_like_one_with_captions_masks_and_buckets(tiny_sd, tmp_path):
    from test_ddp import launch

    data = people_dataset(tmp_path / "data")
    flags = dict(max_train_steps=3, train_batch_size=1, **PEOPLE)
    two = launch(train_args(tiny_sd, data, tmp_path / "two", gradient_accumulation_steps=2, **flags), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = launch(train_args(tiny_sd, data, tmp_path / "one", gradient_accumulation_steps=4, **flags), 1)
    assert one.returncode == 0, one.stderr[-3000:]
    torch.testing.assert_close(learned(tmp_path / "two"), learned(tmp_path / "one"), rtol=1e-4, atol=1e-6)
