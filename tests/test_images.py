"""Photos from --train_data_dir: which files are read, and how each becomes training pixels."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from conftest import make_photo
from PIL import Image

import infer
import textual_inversion as ti


def pixels_of(path, size=16, center_crop=False) -> np.ndarray:
    return ti.fit_pixels(infer.open_rgb(path), (size, size), center_crop)[0]


def test_every_supported_format_is_read_in_sorted_order(tmp_path):
    for name in ["e.webp", "a.png", "c.JPEG", "b.jpg", "d.bmp", "f.tiff", "g.gif", "h.tif"]:
        make_photo(tmp_path / name, (20, 20), mode="P" if name.endswith("gif") else "RGB")
    dataset = ti.TextualInversionDataset(tmp_path, size=16)
    assert [p.name for p in dataset.image_paths] == sorted(
        ["a.png", "b.jpg", "c.JPEG", "d.bmp", "e.webp", "f.tiff", "g.gif", "h.tif"]
    )
    assert all(dataset[i]["pixel_values"].shape == (2, 3, 16, 16) for i in range(len(dataset)))


def test_other_files_and_subfolders_are_skipped_with_one_warning(tmp_path, caplog):
    make_photo(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "metadata.jsonl").write_text("{}")
    (tmp_path / "more").mkdir()
    with caplog.at_level(logging.WARNING, logger="infer"):
        dataset = ti.TextualInversionDataset(tmp_path, size=16)
    assert [p.name for p in dataset.image_paths] == ["photo.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "notes.txt" in warnings[0] and "metadata.jsonl" in warnings[0] and "more/" in warnings[0]


def test_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    red = pixels_of(tmp_path / "anim.gif", 8)
    assert red[..., 0].mean() > 200 and red[..., 2].mean() < 50


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    upright = infer.open_rgb(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[:20].mean(), np.asarray(upright)[20:].mean()
    assert top > 200 and bottom < 50  # the white half now on top


def test_transparency_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("LA", (8, 8), (0, 128)).save(tmp_path / "half.png")
    assert (np.asarray(infer.open_rgb(tmp_path / "clear.png")) == 255).all()
    half = np.asarray(infer.open_rgb(tmp_path / "half.png"))
    assert (abs(half.astype(int) - 127) <= 1).all()


def test_palette_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    image.save(tmp_path / "p.png", transparency=0)
    assert (np.asarray(infer.open_rgb(tmp_path / "p.png")) == 255).all()


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "RGBA", "1", "I", "F"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    if mode in ("I;16", "I", "F"):
        dtype = {"F": np.float32, "I": np.int32, "I;16": np.uint16}[mode]
        image = Image.fromarray(np.full((8, 8), 1.0 if mode == "F" else 65535, dtype=dtype))
        assert image.mode == mode
        path = tmp_path / "img.tiff"
    else:
        image = Image.new(mode, (8, 8))
        path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    image.save(path)
    rgb = infer.open_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if mode in ("I;16", "I", "F"):
        assert (np.asarray(rgb) == 255).all()  # full-scale 16-bit/float white stays white


def test_resize_is_bicubic_to_a_square(tmp_path):
    path = make_photo(tmp_path / "wide.png", (90, 30))
    expected = np.asarray(Image.open(path).convert("RGB").resize((24, 24), Image.Resampling.BICUBIC))
    assert np.array_equal(pixels_of(path, 24), expected)


def test_center_crop_takes_the_middle_square_before_resizing(tmp_path):
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 255, 0), (10, 0, 20, 10))  # the middle square is green
    image.save(tmp_path / "wide.png")
    pixels, crop = ti.fit_pixels(infer.open_rgb(tmp_path / "wide.png"), (20, 20), center_crop=True)
    assert (pixels[..., 1] == 255).all() and (pixels[..., 0] == 0).all()
    assert crop == (0, 20)  # SDXL's crop offset, in the resized (short side = 20) frame


def test_examples_hold_the_photo_and_its_mirror_in_minus_one_to_one(tmp_path):
    make_photo(tmp_path / "a.png", (32, 32))
    example = ti.TextualInversionDataset(tmp_path, size=16)[0]
    as_is, mirrored = example["pixel_values"]
    assert torch_equal(mirrored, as_is.flip(-1))
    assert as_is.min() >= -1 and as_is.max() <= 1
    assert example["original_size"] == (32, 32) and example["crop_top_left"] == (0, 0)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_prompts_hold_all_placeholder_tokens_joined_by_spaces(tmp_path):
    make_photo(tmp_path / "a.png")
    dataset = ti.TextualInversionDataset(tmp_path, size=16, placeholder_token="<x> <x>_1 <x>_2")
    assert len(dataset.prompts) == 27
    assert dataset.prompts[0] == "a photo of a <x> <x>_1 <x>_2"


def test_style_uses_the_style_templates(tmp_path):
    make_photo(tmp_path / "a.png")
    dataset = ti.TextualInversionDataset(tmp_path, size=16, learnable_property="style", placeholder_token="<s>")
    assert len(dataset.prompts) == 19
    assert all("in the style of <s>" in p for p in dataset.prompts)


def test_a_truncated_image_is_named_in_the_error(tmp_path):
    data = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(data, "JPEG")
    (tmp_path / "broken.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ti.UserError, match="broken.jpg"):
        infer.open_rgb(tmp_path / "broken.jpg")


def test_a_file_that_is_not_an_image_is_named_in_the_error(tmp_path):
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(ti.UserError, match="fake.png"):
        infer.open_rgb(tmp_path / "fake.png")


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    make_photo(tmp_path / "big.png", (64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the real limit is ~89M pixels
    with pytest.raises(ti.UserError, match="big.png.*too many pixels"):
        infer.open_rgb(tmp_path / "big.png")


def test_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ti.UserError, match="--train_data_dir .*no such folder"):
        ti.TextualInversionDataset(tmp_path / "nope")


def test_a_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ti.UserError, match="no images.*readme.txt"):
        ti.TextualInversionDataset(tmp_path)
