"""Bad input: one line naming the flag or file, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

import io
import json

import pytest
from conftest import make_photo, train_args
from PIL import Image

import infer
import textual_inversion as ti


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def previous_run(tmp_path):
    """An output folder holding an earlier run's results, which a failed run must not touch."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "learned_embeds.safetensors").write_bytes(b"earlier result")
    (out / "token_identifier.txt").write_text("<earlier>")
    return out


def fails_cleanly(capsys, argv, expected: str, out=None):
    before = snapshot(out) if out is not None and out.is_dir() else None
    assert ti.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert expected in errors[0], errors[0]
    assert not any("Traceback" in line for line in err)
    if before is not None:
        assert snapshot(out) == before


def test_missing_data_dir(tiny_sd, tmp_path, previous_run, capsys):
    argv = train_args(tiny_sd, tmp_path / "nope", previous_run)
    fails_cleanly(capsys, argv, "--train_data_dir", previous_run)


def test_empty_data_dir(tiny_sd, tmp_path, previous_run, capsys):
    (tmp_path / "empty").mkdir()
    fails_cleanly(capsys, train_args(tiny_sd, tmp_path / "empty", previous_run), "no images", previous_run)


def test_data_dir_without_a_readable_image(tiny_sd, tmp_path, previous_run, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "captions.txt").write_text("a toy")
    fails_cleanly(capsys, train_args(tiny_sd, data, previous_run), "no images", previous_run)


def test_corrupt_image_is_named(tiny_sd, tmp_path, previous_run, capsys):
    data = tmp_path / "data"
    make_photo(data / "good.png")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "JPEG")
    (data / "cut.jpg").write_bytes(buffer.getvalue()[:200])
    fails_cleanly(capsys, train_args(tiny_sd, data, previous_run), "cut.jpg", previous_run)


def test_decompression_bomb_is_named(tiny_sd, tmp_path, previous_run, capsys, monkeypatch):
    data = tmp_path / "data"
    make_photo(data / "huge.png", (80, 80))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    fails_cleanly(capsys, train_args(tiny_sd, data, previous_run), "huge.png", previous_run)


def test_placeholder_already_in_the_vocabulary(tiny_sd, photos, previous_run, capsys):
    argv = train_args(tiny_sd, photos, previous_run, placeholder_token="<|startoftext|>")
    fails_cleanly(capsys, argv, "is already in the tokenizer's vocabulary", previous_run)


def test_placeholder_that_is_already_a_word(tiny_sd, photos, previous_run, capsys):
    """An added token "toy" would replace the model's own word "toy" in every prompt."""
    argv = train_args(tiny_sd, photos, previous_run, placeholder_token="toy")
    fails_cleanly(capsys, argv, "--placeholder_token 'toy' is already a word the model knows", previous_run)


@pytest.mark.parametrize("token", ["my duck", " <duck>", "<duck>\t"], ids=["space", "leading", "tab"])
def test_placeholder_with_whitespace(tiny_sd, photos, previous_run, capsys, token):
    argv = train_args(tiny_sd, photos, previous_run, placeholder_token=token)
    fails_cleanly(capsys, argv, f"--placeholder_token {token!r} holds whitespace", previous_run)


def test_blank_initializer(tiny_sd, photos, previous_run, capsys):
    """A phrase of several tokens is fine (tests/test_initializers.py); an empty one is not."""
    argv = train_args(tiny_sd, photos, previous_run, initializer_token="  ")
    fails_cleanly(capsys, argv, "--initializer_token is empty", previous_run)


def test_no_initializer(tiny_sd, photos, previous_run, capsys):
    argv = train_args(tiny_sd, photos, previous_run, initializer_token=None)
    fails_cleanly(capsys, argv, "give --initializer_token (a word or phrase", previous_run)


def test_initializer_token_and_embedding_together(tiny_sd, photos, previous_run, capsys):
    argv = train_args(tiny_sd, photos, previous_run, initializer_embedding=previous_run)
    fails_cleanly(capsys, argv, "--initializer_embedding (an embedding to continue), one of the two", previous_run)


def test_num_vectors_below_one(tiny_sd, photos, previous_run, capsys):
    fails_cleanly(capsys, train_args(tiny_sd, photos, previous_run, num_vectors=0), "--num_vectors", previous_run)


def test_resolution_not_a_multiple_of_8(tiny_sd, photos, previous_run, capsys):
    fails_cleanly(capsys, train_args(tiny_sd, photos, previous_run, resolution=100), "--resolution", previous_run)


def test_model_path_that_does_not_exist(tmp_path, photos, previous_run, capsys):
    argv = train_args(tmp_path / "no-model", photos, previous_run)
    fails_cleanly(capsys, argv, "--pretrained_model_name_or_path", previous_run)


def test_model_folder_that_is_not_stable_diffusion(tmp_path, photos, previous_run, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    fails_cleanly(capsys, train_args(folder, photos, previous_run), "no model_index.json", previous_run)


def test_model_index_of_another_pipeline(tmp_path, photos, previous_run, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": []}))
    argv = train_args(folder, photos, previous_run)
    fails_cleanly(capsys, argv, "FluxPipeline (transformer) is not a Stable Diffusion", previous_run)


def test_model_folder_with_a_broken_component(tmp_path, tiny_sd, photos, previous_run, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd, folder)
    shutil.rmtree(folder / "unet")
    fails_cleanly(capsys, train_args(folder, photos, previous_run), "cannot load unet", previous_run)


def test_resume_path_that_does_not_exist(tiny_sd, photos, previous_run, capsys):
    argv = train_args(tiny_sd, photos, previous_run, resume_from_checkpoint="checkpoint-999")
    fails_cleanly(capsys, argv, "--resume_from_checkpoint checkpoint-999", previous_run)


def test_resume_from_a_checkpoint_of_another_token(tiny_sd, photos, tmp_path, capsys, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, checkpointing_steps=1))
    argv = train_args(tiny_sd, photos, out, placeholder_token="<other>", resume_from_checkpoint="latest")
    fails_cleanly(capsys, argv, "use the same --placeholder_token", out)


def test_output_dir_that_is_a_file(tiny_sd, photos, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    fails_cleanly(capsys, train_args(tiny_sd, photos, target), "--output_dir")
    assert target.read_text() == "keep me"


def test_tracker_that_is_not_installed(tiny_sd, photos, previous_run, capsys):
    argv = train_args(tiny_sd, photos, previous_run, report_to="wandb")
    fails_cleanly(capsys, argv, "--report_to wandb: wandb is not installed", previous_run)


def test_validation_scores_without_a_validation_prompt(tiny_sd, photos, tmp_path, capsys):
    argv = train_args(tiny_sd, photos, tmp_path / "out", validation_scores=True)
    fails_cleanly(capsys, argv, "--validation_scores scores the validation images: give --validation_prompt")


def test_validation_scores_from_an_initializer_embedding_need_a_class_word(tiny_sd, photos, tmp_path, capsys):
    embedding = tmp_path / "start.safetensors"
    argv = train_args(
        tiny_sd, photos, tmp_path / "out", validation_scores=True, validation_prompt="a <concept>",
        initializer_token=None, initializer_embedding=embedding,
    )  # fmt: skip
    fails_cleanly(capsys, argv, "needs --class_word")


def test_a_scorer_that_is_not_available_offline_is_named(tiny_sd, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = train_args(
        tiny_sd, photos, tmp_path / "out", validation_scores=True, validation_prompt="a <concept>",
        clip_model=tmp_path / "no-such-clip",
    )  # fmt: skip
    fails_cleanly(capsys, argv, "--clip_model")


def carrying_status(status: int):
    def fail(args):
        error = infer.UserError("--flag: what to fix")
        error.status = status
        raise error

    return fail


def test_the_trainer_exits_with_the_status_its_error_carries(monkeypatch, capsys):
    monkeypatch.setattr(ti, "run_training", carrying_status(3))
    assert ti.main(train_args("m", "d", "o")) == 3
    assert capsys.readouterr().err.strip() == "error: --flag: what to fix"


def test_infer_py_exits_with_the_status_its_error_carries(monkeypatch, capsys):
    monkeypatch.setattr(infer, "run_generate", carrying_status(3))
    assert infer.main(["--model", "m", "--prompt", "a <concept>"]) == 3
    assert capsys.readouterr().err.strip() == "error: --flag: what to fix"
