"""Watching a run: validation images and loss, metrics, early stopping, norms, the plot, the Hub."""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import RESOLUTION, plan_for, train_args
from PIL import Image
from safetensors.torch import load_file

import infer
import textual_inversion as ti


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def learned(out, name="learned_embeds.safetensors"):
    return load_file(out / name)["<concept>"]


VALIDATION = dict(validation_prompt="a photo of a <concept>", num_validation_images=2, validation_inference_steps=2)


def test_validation_grids_appear_every_validation_steps_and_at_the_end(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=5, validation_steps=2, **VALIDATION))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2.png", "step-4.png", "step-5.png"]
    assert [len(row) for row in infer.grid_tiles(out / "validation" / "step-5.png")] == [2]


def test_each_validation_prompt_is_a_row_of_the_grid(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    argv = train_args(tiny_sd, photos, out, "--validation_prompt", "a <concept> on the beach", max_train_steps=1)
    more = [
        "--validation_prompt",
        "a red <concept>",
        "--num_validation_images",
        "3",
        "--validation_inference_steps",
        "2",
    ]
    run_trainer([*argv, *more])
    tiles = infer.grid_tiles(out / "validation" / "step-1.png")
    assert [[tile.size for tile in row] for row in tiles] == [[(RESOLUTION, RESOLUTION)] * 3] * 2


def solid_rows(rows: int, columns: int) -> list[list[Image.Image]]:
    return [[Image.new("RGB", (RESOLUTION, RESOLUTION), (90, 140, 200)) for _ in range(columns)] for _ in range(rows)]


def label_strips(grid: Image.Image, rows: int, columns: int) -> list[np.ndarray]:
    """The pixels left of each row of tiles (tiles fill the bottom-right corner)."""
    left, top = grid.width - columns * RESOLUTION, grid.height - rows * RESOLUTION
    return [np.asarray(grid.crop((0, top + r * RESOLUTION, left, top + (r + 1) * RESOLUTION))) for r in range(rows)]


def test_a_validation_grid_names_its_step_above_and_each_rows_prompt_beside_it():
    rows = solid_rows(2, 3)
    grid = infer.labelled_grid(rows, ["a red <concept>", "a <concept> on the beach"], "step 3")
    assert grid.width > 3 * RESOLUTION and grid.height > 2 * RESOLUTION
    title = np.asarray(grid.crop((0, 0, grid.width, grid.height - 2 * RESOLUTION)))
    first, second = label_strips(grid, 2, 3)
    assert (title < 100).any() and (first < 100).any() and (second < 100).any()  # dark text in all three
    assert not np.array_equal(first, second)  # two prompts, two labels
    corner = grid.crop((grid.width - 3 * RESOLUTION, grid.height - 2 * RESOLUTION, grid.width, grid.height))
    assert np.array_equal(np.asarray(corner), np.asarray(infer.image_grid([i for row in rows for i in row], 3)))


def test_a_long_prompt_is_cut_to_its_own_row():
    grid = infer.labelled_grid(solid_rows(2, 1), ["a <concept> " * 200, ""], "step 1")
    first, second = label_strips(grid, 2, 1)
    assert (first < 100).any() and not (second < 100).any()  # nothing spills into the next row


def test_a_validation_grid_carries_its_settings_as_a1111_parameters(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, validation_steps=2, **VALIDATION))
    path = out / "validation" / "step-2.png"
    settings = infer.read_png_settings(path)
    assert settings["prompts"] == ["a photo of a <concept>"] and len(settings["seeds"]) == 2
    with Image.open(path) as grid:
        prompt, line = grid.text["parameters"].splitlines()
    assert prompt == "a photo of a <concept>"
    assert line == (
        f"Steps: 2, Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale: 7.5, Seed: {settings['seeds'][0]}, "
        f"Size: {RESOLUTION}x{RESOLUTION}, Model: {tiny_sd.name}, Embedding step: 2"
    )


def test_validation_images_use_fixed_seeds_so_grids_compare(tiny_sd, photos, tmp_path, run_trainer):
    """With a zero learning rate nothing changes between steps, so neither may the images."""
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, validation_steps=1, learning_rate=0, **VALIDATION))
    first, second = (infer.grid_tiles(out / "validation" / f"step-{k}.png") for k in (1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(first[0], second[0]))


def test_a_validation_prompt_gives_every_occurrence_of_the_word_all_its_vectors(tiny_sd, photos, tmp_path, run_trainer):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    out, prompt = tmp_path / "out", "a <concept> next to a <concept>"
    flags = dict(validation_prompt=prompt, num_validation_images=1, validation_inference_steps=2, num_vectors=2)
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=1, learning_rate=0.5, **flags))
    grid = np.asarray(infer.grid_tiles(out / "validation" / "step-1.png")[0][0]).astype(int)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(out)
    # diffusers' loader puts all vectors at every occurrence; the run's grid is what it makes.
    word = "<concept> <concept>_1"
    assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer) == f"a {word} next to a {word}"
    made = np.asarray(ti.validation_images(pipe, [prompt], 1, 0, RESOLUTION, 2)[0][0]).astype(int)
    assert np.abs(grid - made).max() <= 1


def test_validation_images_come_from_the_models_in_memory(tiny_sd, photos, tmp_path, run_trainer, monkeypatch):
    import diffusers

    def no_reload(*args, **kwargs):
        raise AssertionError("validation reloaded a pipeline from disk")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_reload)
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", no_reload)
    run_trainer(train_args(tiny_sd, photos, tmp_path / "out", max_train_steps=1, **VALIDATION))


def test_the_start_up_line_names_the_device_precision_threads_and_vectors(
    tiny_sd, photos, tmp_path, run_trainer, caplog
):
    with caplog.at_level(logging.INFO, logger="textual_inversion"):
        run_trainer(train_args(tiny_sd, photos, tmp_path / "out", max_train_steps=1, num_vectors=2))
    (line,) = [r.getMessage() for r in caplog.records if " photos (" in r.getMessage()]
    assert "2 vectors of width 32" in line
    assert f"on cpu, precision float32 (learned vectors float32), {torch.get_num_threads()} CPU thread" in line


def test_validation_loss_is_bit_identical_when_evaluated_twice(tiny_sd, photos, tmp_path):
    from test_training import build_stages

    s = build_stages(tiny_sd, photos, tmp_path)
    batch = ti.validation_batch(seed=3, data=s.data, num_timesteps=1000)
    assert len(batch) == s.data.num_images * 4  # every photo at 4 timesteps
    first = ti.validation_loss(s.models, s.data, batch, chunk=8)
    assert ti.validation_loss(s.models, s.data, batch, chunk=8) == first
    assert ti.validation_loss(s.models, s.data, batch, chunk=5) == pytest.approx(first, rel=1e-6)
    again = ti.validation_batch(seed=3, data=s.data, num_timesteps=1000)
    assert torch.equal(again.noise, batch.noise) and torch.equal(again.timesteps, batch.timesteps)


def test_validation_timesteps_cover_the_schedule_evenly(tiny_sd, photos, tmp_path):
    from test_training import build_stages

    s = build_stages(tiny_sd, photos, tmp_path)
    timesteps = ti.validation_batch(seed=0, data=s.data, num_timesteps=1000).timesteps.view(-1, 4)
    for quarter, column in enumerate(timesteps.T):
        assert ((column >= 250 * quarter) & (column < 250 * (quarter + 1))).all()


def test_metrics_jsonl_has_one_object_per_log_event(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=4, logging_steps=2, validation_steps=3))
    records = metrics(out)
    assert [r["step"] for r in records] == [0, 2, 3, 4]
    assert set(records[0]) == {"step", "val_loss"}  # the initializer's loss, before any step
    assert {"loss", "lr", "samples_per_second", "embedding_norm", "vocab_median_norm"} <= set(records[1])
    assert set(records[2]) == {"step", "val_loss"}
    assert {"loss", "val_loss"} <= set(records[3])  # the last step is logged and validated


def test_resumed_run_continues_metrics_from_its_checkpoint(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    flags = dict(logging_steps=1, validation_steps=1, checkpointing_steps=2)
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=3, **flags))
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=4, resume_from_checkpoint="checkpoint-2", **flags))
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3, 4]


def test_resume_latest_without_a_checkpoint_starts_a_fresh_log(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, logging_steps=1, checkpointing_steps=9))
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, logging_steps=1, resume_from_checkpoint="latest"))
    assert [r["step"] for r in metrics(out)] == [0, 1, 2]


def test_sdxl_metrics_watch_both_encoders(tiny_sdxl, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sdxl, photos, out, max_train_steps=2, logging_steps=1))
    record = metrics(out)[1]
    assert {"embedding_norm", "embedding_norm_2", "vocab_median_norm", "vocab_median_norm_2"} <= set(record)


def scripted_validation_loss(monkeypatch, losses):
    sequence = iter(losses)
    monkeypatch.setattr(ti, "validation_loss", lambda *a, **k: [next(sequence)])


def test_early_stopping_can_keep_the_initializer_when_nothing_beats_it(
    tiny_sd, photos, tmp_path, run_trainer, monkeypatch
):
    scripted_validation_loss(monkeypatch, [0.5, 0.9, 0.9])
    out = tmp_path / "out"
    result = run_trainer(
        train_args(tiny_sd, photos, out, validation_steps=1, early_stopping_patience=2, max_train_steps=9)
    )
    assert result.steps == 2  # step 0 stayed best through two evaluations
    from transformers import CLIPTextModel, CLIPTokenizer

    init_id = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer").encode("toy", add_special_tokens=False)[0]
    row = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").get_input_embeddings().weight[init_id]
    assert torch.equal(learned(out)[0], row)  # the kept embedding is the untouched initializer


def test_early_stopping_stops_and_keeps_the_best_step(tiny_sd, photos, tmp_path, run_trainer, monkeypatch, caplog):
    scripted_validation_loss(monkeypatch, [1.1, 1.0, 0.8, 0.9, 0.95, 0.7])  # step 0, then best at step 4
    out = tmp_path / "out"
    flags = dict(validation_steps=2, save_steps=2, early_stopping_patience=2, max_train_steps=20)
    with caplog.at_level(logging.INFO, logger="textual_inversion"):
        result = run_trainer(train_args(tiny_sd, photos, out, **flags))
    assert result.steps == 8  # evaluations at 2, 4 (best), 6, 8: two without improvement
    assert torch.equal(learned(out), learned(out, "learned_embeds-steps-4.safetensors"))
    assert not torch.equal(learned(out, "learned_embeds-last.safetensors"), learned(out))
    assert torch.equal(torch.load(out / "learned_embeds.bin", weights_only=True)["<concept>"], learned(out))
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Done"))
    assert "kept step 4 (stopped early: no better validation loss in 2 evaluations, 0.8000)" in summary


def test_counts_are_printed_with_their_noun_in_the_right_number():
    assert [infer.plural(n, "evaluation") for n in (0, 1, 2)] == ["0 evaluations", "1 evaluation", "2 evaluations"]
    assert infer.plural(1, "process", "processes") == "1 process"
    assert infer.plural(2, "process", "processes") == "2 processes"


def test_early_stopping_after_one_evaluation_says_one_evaluation():
    state = ti.ConceptState()
    for loss in (0.5, 0.9):
        state.judge(2, loss, [torch.zeros(1, 4)], patience=1)
    assert state.kept(2, 1) == "step 2 (stopped early: no better validation loss in 1 evaluation, 0.5000)"


def test_without_early_stopping_the_last_step_is_kept(tiny_sd, photos, tmp_path, run_trainer, monkeypatch):
    scripted_validation_loss(monkeypatch, [1.1, 1.0, 0.8, 0.9, 0.95])
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, validation_steps=2, max_train_steps=8))
    assert not (out / "learned_embeds-last.safetensors").exists()


def test_early_stopping_state_survives_a_resume(tiny_sd, photos, tmp_path, run_trainer, monkeypatch):
    flags = dict(validation_steps=1, early_stopping_patience=2, checkpointing_steps=2, max_train_steps=10)
    scripted_validation_loss(monkeypatch, [1.1, 1.0, 0.5, 0.9])  # steps 0-3: best at step 2, checkpoint at 2
    out = tmp_path / "out"
    with pytest.raises(StopIteration):
        run_trainer(train_args(tiny_sd, photos, out, **flags))
    scripted_validation_loss(monkeypatch, [0.9, 0.9])  # steps 3 and 4: no improvement on 0.5
    result = run_trainer(train_args(tiny_sd, photos, out, resume_from_checkpoint="checkpoint-2", **flags))
    assert result.steps == 4
    assert torch.equal(learned(out), learned(out / "checkpoint-2"))


def test_embedding_norm_is_logged_next_to_the_vocabulary_median(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, logging_steps=1))
    first = metrics(out)[1]
    assert first["embedding_norm"] == pytest.approx(learned(out, "learned_embeds.safetensors").norm(), rel=0.5)
    assert first["vocab_median_norm"] > 0


def test_max_embedding_norm_projects_the_rows_back(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=3, num_vectors=2, max_embedding_norm=0.05))
    assert (learned(out).norm(dim=1) <= 0.05 + 1e-6).all()


def test_tensorboard_receives_the_metrics_and_validation_images(tiny_sd, photos, tmp_path, run_trainer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run_trainer(
        train_args(tiny_sd, photos, out, max_train_steps=2, logging_steps=1, report_to="tensorboard", **VALIDATION)
    )
    run_folder = out / "logs" / "textual_inversion"  # (accelerate puts the hparams in a subfolder)
    accumulator = EventAccumulator(str(run_folder), size_guidance={"images": 0})
    accumulator.Reload()
    assert {"loss", "val_loss", "embedding_norm"} <= set(accumulator.Tags()["scalars"])
    assert accumulator.Tags()["images"]


def test_loss_plot_is_drawn_at_each_validation(tiny_sd, photos, tmp_path, run_trainer):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=3, logging_steps=1, validation_steps=2))
    with Image.open(out / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300


def drawn_figure(monkeypatch, plot):
    """The matplotlib figure `plot()` saves."""
    figures, save = [], infer.save_figure
    monkeypatch.setattr(infer, "save_figure", lambda figure, path: figures.append(figure) or save(figure, path))
    plot()
    return figures[0]


def legends_over_axes(figure) -> tuple[int, int]:
    """(legends, legends overlapping any axes' data area) of a drawn figure."""
    legends = [*figure.legends, *(axis.get_legend() for axis in figure.axes if axis.get_legend())]
    covering = [
        legend
        for legend in legends
        if any(legend.get_window_extent().overlaps(axis.get_window_extent()) for axis in figure.axes)
    ]
    return len(legends), len(covering)


def test_loss_plot_legends_sit_beside_the_data(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    history = [
        {"step": s, "loss": 1 / s, "val_loss": 1 / s, "embedding_norm": 0.4, "vocab_median_norm": 0.4}
        for s in (1, 2, 3)
    ]
    figure = drawn_figure(monkeypatch, lambda: ti.plot_run(history, tmp_path / "loss.png"))
    assert legends_over_axes(figure) == (2, 0)


def test_without_matplotlib_the_plot_is_skipped_with_one_line(
    tiny_sd, photos, tmp_path, run_trainer, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="textual_inversion"):
        run_trainer(train_args(tiny_sd, photos, out, max_train_steps=3, validation_steps=1))
    assert not (out / "loss.png").exists()
    assert sum("loss.png was skipped" in r.getMessage() for r in caplog.records) == 1


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: nothing can reach the Hub from the test machines,
    so the test checks the exact calls and the folder that would be uploaded."""

    def __init__(self):
        self.calls = []

    def __call__(self, token):
        self.calls.append(("HfApi", {"token": token}))
        return self

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return SimpleNamespace(repo_id=f"someone/{kwargs['repo_id']}")

    def upload_folder(self, **kwargs):
        from pathlib import Path

        kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs))


@pytest.fixture
def hub(monkeypatch):
    recorder = RecordingHub()
    monkeypatch.setattr(ti, "hub_api", recorder)
    return recorder


def hub_run(run_trainer, model, photos, out, *extra, **flags):
    argv = train_args(
        model, photos, out, "--push_to_hub", "--hub_token", "hf_SECRET", *extra, max_train_steps=2, **flags
    )
    return run_trainer([*argv, "--hub_model_id", "my-concept", "--hub_private"])


def test_push_to_hub_uploads_exactly_the_embedding_files_plot_grid_and_card(
    tiny_sd, photos, tmp_path, run_trainer, hub
):
    out = tmp_path / "out"
    hub_run(run_trainer, tiny_sd, photos, out, checkpointing_steps=1, save_steps=1, **VALIDATION)
    names = [name for name, _ in hub.calls]
    assert names == ["HfApi", "create_repo", "HfApi", "upload_folder"]
    assert hub.calls[1][1] == {"repo_id": "my-concept", "private": True, "exist_ok": True}
    upload = hub.calls[3][1]
    assert upload["repo_id"] == "someone/my-concept"
    expected = [
        "README.md",
        "learned_embeds.bin",
        "learned_embeds.safetensors",
        "loss.png",
        "token_identifier.txt",
        "type_of_concept.txt",
        "validation.png",
    ]
    assert upload["files"] == expected
    assert (out / "checkpoint-1").exists()  # checkpoints stay local


def test_model_card_says_what_was_trained_and_how_to_use_it(tiny_sd, photos, tmp_path, run_trainer, hub):
    out = tmp_path / "out"
    hub_run(run_trainer, tiny_sd, photos, out, **VALIDATION)
    card = (out / "hub" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert f"base_model: {tiny_sd}" in card
    for expected in ("# <concept>", "(object)", "| steps | 2 |", "| initializer | toy |", "| seed | 0 |"):
        assert expected in card
    assert 'pipe.load_textual_inversion("someone/my-concept")' in card
    assert "python infer.py --model" in card and "--embedding someone/my-concept" in card
    assert "![validation](validation.png)" in card and "![loss](loss.png)" in card


def test_sdxl_model_card_loads_both_encoders(tiny_sdxl, photos, tmp_path, run_trainer, hub):
    out = tmp_path / "out"
    hub_run(run_trainer, tiny_sdxl, photos, out)
    card = (out / "hub" / "README.md").read_text()
    assert 'weight_name="learned_embeds_2.safetensors"' in card and "text_encoder=pipe.text_encoder_2" in card
    assert hub.calls[-1][1]["files"] == [
        "README.md",
        "concept.safetensors",
        "learned_embeds.safetensors",
        "learned_embeds_2.safetensors",
        "loss.png",
        "token_identifier.txt",
        "type_of_concept.txt",
    ]


def test_the_hub_token_is_never_written_or_logged(tiny_sd, photos, tmp_path, run_trainer, hub, caplog, capsys):
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        hub_run(run_trainer, tiny_sd, photos, out, **VALIDATION)
    assert "hf_SECRET" not in caplog.text + capsys.readouterr().err
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_SECRET" not in path.read_bytes(), path
    args = ti.parse_args(train_args("m", "d", out, hub_token="hf_SECRET"))
    assert "hub_token" not in ti.tracker_config(args, plan_for(args))


def test_a_hub_repo_that_cannot_be_created_fails_before_training(tiny_sd, photos, tmp_path, capsys, monkeypatch):
    def refuse(token):
        raise RuntimeError("401 Client Error: Unauthorized")

    monkeypatch.setattr(ti, "hub_api", refuse)
    out = tmp_path / "out"
    argv = train_args(tiny_sd, photos, out, "--push_to_hub")
    assert ti.main([str(a) for a in argv]) == 2
    assert "--push_to_hub: cannot create the Hub repo 'out' (401 Client Error: Unauthorized)" in capsys.readouterr().err
    assert not out.exists()


# --validation_scores: the validation images scored with infer.py eval's scorers.

SCORED = dict(VALIDATION, validation_scores=True)
SCORE_KEYS = {"clip_i", "clip_t", "dino"}


def scored_args(tiny_sd, photos, out, tiny_clip, tiny_dino, **flags):
    return train_args(tiny_sd, photos, out, clip_model=tiny_clip, dino_model=tiny_dino, **{**SCORED, **flags})


def test_validation_scores_are_written_at_each_validation_with_images(
    tiny_sd, photos, tiny_clip, tiny_dino, tmp_path, run_trainer
):
    out = tmp_path / "out"
    run_trainer(scored_args(tiny_sd, photos, out, tiny_clip, tiny_dino, max_train_steps=3, validation_steps=2))
    scored = {line["step"]: line for line in metrics(out) if SCORE_KEYS & line.keys()}
    assert sorted(scored) == [2, 3]  # step 0's baseline has no images to score
    assert all(line.keys() >= SCORE_KEYS and "val_loss" in line for line in scored.values())
    assert all(-1 <= line[key] <= 1 for line in scored.values() for key in SCORE_KEYS)


def test_a_run_without_validation_scores_writes_no_scores(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, max_train_steps=2, validation_steps=1, **VALIDATION))
    assert not any(SCORE_KEYS & line.keys() for line in metrics(out))


def test_validation_scores_equal_the_scorers_on_the_saved_grid(
    tiny_sd, photos, tiny_clip, tiny_dino, tmp_path, run_trainer
):
    """The grid's tiles are the validation images (PNG is lossless); CLIP-T reads the prompt with
    the class word (here the initializer, toy) in place of the new word."""
    out = tmp_path / "out"
    run_trainer(scored_args(tiny_sd, photos, out, tiny_clip, tiny_dino, max_train_steps=1))
    (tiles,) = infer.grid_tiles(out / "validation" / "step-1.png")
    scorers = infer.Scorers(str(tiny_clip), str(tiny_dino))
    expected = scorers.score(tiles, ["a photo of a toy"] * 2, infer.read_photos(photos, "photos"))
    (line,) = [line for line in metrics(out) if line["step"] == 1]
    for key in SCORE_KEYS:
        assert line[key] == pytest.approx(expected[key].double().mean().item(), abs=1e-5)


def test_class_word_replaces_the_initializer_in_clip_t(tiny_sd, photos, tiny_clip, tiny_dino, tmp_path, run_trainer):
    runs = {}
    for word in ("toy", "volcano"):
        out = tmp_path / word
        run_trainer(scored_args(tiny_sd, photos, out, tiny_clip, tiny_dino, max_train_steps=1, class_word=word))
        runs[word] = next(line for line in metrics(out) if line["step"] == 1)
    assert runs["toy"]["clip_i"] == runs["volcano"]["clip_i"]  # the same images
    assert runs["toy"]["clip_t"] != runs["volcano"]["clip_t"]  # read against other text


def test_loss_plot_gains_a_scores_panel(tmp_path):
    pytest.importorskip("matplotlib")
    history = [
        {"step": s, "loss": 0.1, "val_loss": 0.1, "embedding_norm": 0.4, "vocab_median_norm": 0.4} for s in (1, 2)
    ]
    scores = [{"step": 2, "clip_i": 0.7, "clip_t": 0.25, "dino": 0.5}]
    ti.plot_run(history, tmp_path / "plain.png")
    ti.plot_run(history + scores, tmp_path / "scored.png")
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "scored.png") as scored:
        assert scored.size[0] == plain.size[0] and scored.size[1] > plain.size[1]
