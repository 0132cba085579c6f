"""Several concepts in one run (--concepts_list): each its own word, photos, rows, validation loss,
early stopping and folder; one model, one photo bank, each step's samples in one UNet call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_args, train_once
from safetensors.torch import load_file

import infer
import textual_inversion as ti


def listing(folder: Path, entries: list[dict]) -> Path:
    path = folder / "concepts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


def two_concepts(photos: Path, hat: Path, **extra) -> list[dict]:
    return [
        {"placeholder_token": "<dog>", "train_data_dir": str(photos), "initializer_token": "dog", **extra},
        {"placeholder_token": "<hat>", "train_data_dir": str(hat), "initializer_token": "hat", "num_vectors": 2},
    ]


def joint_args(model: Path, out: Path, concepts: Path, **flags) -> list[str]:
    """train_args with the concepts from the file: no --train_data_dir or --placeholder_token."""
    return train_args(model, None, out, placeholder_token=None, concepts_list=concepts, **flags)


def rows(folder: Path, token: str) -> torch.Tensor:
    return load_file(folder / "learned_embeds.safetensors")[token]


def prepared(model: Path, out: Path, concepts: Path, **flags) -> ti.Run:
    """The trainer's prepare stage on its own: models, words, the photo bank, the state."""
    args = ti.parse_args(joint_args(model, out, concepts, **flags))
    out.mkdir(parents=True)  # as run_training's lock on --output_dir makes it
    return ti.prepare(args, ti.make_accelerator(args), ti.StopSignals())


# ----------------------------------------------------------------------------------------
# The concepts file.


def test_a_list_of_one_concept_trains_bit_for_bit_what_the_same_flags_train(tiny_sd, photos, tmp_path):
    train_once(train_args(tiny_sd, photos, tmp_path / "plain"))
    entry = {"placeholder_token": "<concept>", "train_data_dir": str(photos)}
    train_once(joint_args(tiny_sd, tmp_path / "listed", listing(tmp_path, [entry])))
    assert torch.equal(rows(tmp_path / "listed" / "concept", "<concept>"), rows(tmp_path / "plain", "<concept>"))
    metrics = [infer.read_jsonl(tmp_path / run / "metrics.jsonl") for run in ("plain", "listed")]
    assert [r.get("val_loss") for r in metrics[0]] == [r.get("val_loss/concept") for r in metrics[1]]


def test_the_command_line_gives_every_concept_its_defaults(tiny_sd, photos, tmp_path):
    concepts = listing(tmp_path, [{"placeholder_token": "<a>"}, {"placeholder_token": "<b>", "repeats": 3}])
    args = ti.parse_args(train_args(tiny_sd, photos, tmp_path / "out", placeholder_token=None, concepts_list=concepts))
    (a, first), (b, second) = ti.read_concepts(args)
    assert (a, b) == ("a", "b")
    assert first.train_data_dir == second.train_data_dir == str(photos)
    assert (first.repeats, second.repeats, first.initializer_token) == (100, 3, "toy")
    assert args.placeholder_token is None  # the flags themselves are never rewritten


@pytest.mark.parametrize(
    "entries, message",
    [
        ("[{", "not JSON"),
        ('{"placeholder_token": "<a>"}', "give a JSON list with an object per concept"),
        ('[{"placeholder_token": "<a>", "colour": "red"}]', "concept 1: unknown key 'colour'"),
        ('[{"placeholder_token": "<a>"}, {"placeholder_token": "<a>"}]', "placeholder_token '<a>' is concept 1's"),
        ('[{"placeholder_token": "<a>", "num_vectors": "2"}]', "concept 1: num_vectors must be a JSON int"),
        ('[{"placeholder_token": "<a>", "repeats": 0}]', "concept 1: --repeats must be at least 1"),
        ('[{"placeholder_token": "<a>", "validation_prompt": [1]}]', "validation_prompt must be a string or a list"),
        ('[{"placeholder_token": "<a>", "name": "../a"}]', "concept 1: '../a' cannot name a folder"),
        ('[{"train_data_dir": "x"}]', "concept 1: no placeholder_token"),
    ],
)  # fmt: skip
def test_a_bad_concepts_file_is_one_line_naming_the_file_and_the_entry(
    tiny_sd, photos, tmp_path, capsys, entries, message
):
    path = tmp_path / "concepts.json"
    path.write_text(entries)
    argv = train_args(tiny_sd, photos, tmp_path / "out", placeholder_token=None, concepts_list=path)
    assert ti.main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert f"--concepts_list {path}" in line and message in line


# ----------------------------------------------------------------------------------------
# What trains what.


def test_a_word_gets_no_gradient_from_samples_whose_prompts_never_name_it(tiny_sd, photos, other_photos, tmp_path):
    run = prepared(tiny_sd, tmp_path / "out", listing(tmp_path, two_concepts(photos, other_photos)))
    dog, hat = (p.rows[0] for p in run.placeholders)
    images = (run.data.concept_of == 0).nonzero().flatten()  # the dog's photos only
    batch = ti.draw_batch(torch.Generator().manual_seed(0), images, run.data, 1000)
    ti.denoising_loss(run.models, run.data, batch).mean().backward()
    assert dog.grad.abs().sum() > 0
    assert hat.grad is None or torch.count_nonzero(hat.grad) == 0


def test_a_caption_naming_two_words_trains_both(tiny_sd, photos, other_photos, tmp_path):
    captioned = Path(shutil.copytree(photos, tmp_path / "captioned"))
    for photo in captioned.iterdir():
        photo.with_suffix(".txt").write_text("a photo of <dog> wearing <hat>")
    concepts = two_concepts(captioned, other_photos, caption_extension=".txt")
    run = prepared(tiny_sd, tmp_path / "out", listing(tmp_path, concepts))
    records = infer.read_jsonl(tmp_path / "out" / "dataset.jsonl")
    assert records[0]["concept"] == "dog" and records[0]["prompts"] == ["a photo of <dog> wearing <hat> <hat>_1"]
    assert {r["concept"] for r in records} == {"dog", "hat"}
    dog, hat = (p.rows[0] for p in run.placeholders)
    images = (run.data.concept_of == 0).nonzero().flatten()
    batch = ti.draw_batch(torch.Generator().manual_seed(0), images, run.data, 1000)
    ti.denoising_loss(run.models, run.data, batch).mean().backward()
    assert dog.grad.abs().sum() > 0 and hat.grad.abs().sum() > 0


@pytest.mark.parametrize("balanced, steps, shares", [(False, 10, [12, 8]), (True, 12, [12, 12])])
def test_each_steps_batch_is_drawn_across_concepts_in_proportion_or_balanced(
    tiny_sd, photos, other_photos, tmp_path, balanced, steps, shares
):
    """3 dog photos and 2 hat photos, one pass each per epoch, 2 samples a step: in proportion, 10
    steps are 4 epochs of 5 slots; balanced, 12 steps are 2 epochs of 12 (each dog photo twice,
    each hat photo 3 times)."""
    concepts = two_concepts(photos, other_photos)
    for entry in concepts:
        entry["repeats"] = 1
    run = prepared(tiny_sd, tmp_path / "out", listing(tmp_path, concepts), max_train_steps=steps)
    stream = ti.sample_stream(run.state, steps, run.data, run.plan.concepts, balanced)
    drawn = torch.cat([ti.step_images(stream, step, 2, torch.device("cpu"))[0] for step in range(steps)])
    assert torch.bincount(run.data.concept_of[drawn]).tolist() == shares


def test_buckets_and_masks_mix_concepts_in_one_unet_call(tiny_sd, other_photos, tmp_path):
    from test_dataset import PEOPLE, people_dataset

    people = people_dataset(tmp_path / "people")
    concepts = [
        {"placeholder_token": "<dog>", "train_data_dir": str(people), "initializer_token": "dog"},
        {"placeholder_token": "<hat>", "train_data_dir": str(other_photos), "initializer_token": "hat"},
    ]
    run = prepared(tiny_sd, tmp_path / "out", listing(tmp_path, concepts), **PEOPLE)
    assert len(run.data.bucket_sizes) > 1 and run.data.loss_weight.min() < 1  # buckets, and masks weigh
    mixed = [m for m in run.data.bucket_members if len(set(run.data.concept_of[m].tolist())) == 2]
    assert mixed  # the square bucket holds photos of both concepts
    batch = ti.draw_batch(torch.Generator().manual_seed(0), mixed[0], run.data, 1000, run.data.bucket_of[mixed[0][0]])
    ti.denoising_loss(run.models, run.data, batch).mean().backward()  # one call, both words
    assert all(p.rows[0].grad.abs().sum() > 0 for p in run.placeholders)


# ----------------------------------------------------------------------------------------
# Each concept its own result.


def test_each_concept_gets_the_files_of_a_one_concept_run_and_loads_in_diffusers(
    tiny_sd, photos, other_photos, tmp_path
):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    train_once(joint_args(tiny_sd, out, listing(tmp_path, two_concepts(photos, other_photos)), save_steps=2))
    assert json.loads((out / infer.CONCEPTS_FILE).read_text()) == {"concepts": ["dog", "hat"]}
    for name, token in (("dog", "<dog>"), ("hat", "<hat>")):
        names = {p.name for p in (out / name).iterdir()}
        assert {"learned_embeds.safetensors", "learned_embeds-steps-2.safetensors", "token_identifier.txt",
                "type_of_concept.txt", "run.json"} <= names  # fmt: skip
        assert (out / name / "token_identifier.txt").read_text() == token
        assert json.loads((out / name / "run.json").read_text())["placeholder_token"] == token
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_textual_inversion(out / "dog")
    pipe.load_textual_inversion(out / "hat")
    encoder = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["<dog>", "<hat>", "<hat>_1"])
    assert torch.equal(encoder[ids[0]], rows(out / "dog", "<dog>")[0])
    assert torch.equal(encoder[ids[1:]], rows(out / "hat", "<hat>"))
    metrics = infer.read_jsonl(out / "metrics.jsonl")
    assert {"val_loss/dog", "val_loss/hat", "embedding_norm/dog", "embedding_norm/hat"} <= set(metrics[-1])


def test_early_stopping_freezes_one_concept_and_keeps_its_best_step_while_the_other_trains_on(
    tiny_sd, photos, other_photos, tmp_path, monkeypatch, caplog
):
    scripted = iter([[1.0, 1.0], [0.9, 0.9], [0.95, 0.8], [0.97, 0.7], [None, 0.6], [None, 0.5], [None, 0.4]])
    monkeypatch.setattr(ti, "validation_loss", lambda *a, **k: next(scripted))
    out = tmp_path / "out"
    flags = dict(validation_steps=1, early_stopping_patience=2, save_steps=1, max_train_steps=6)
    images = dict(validation_prompt="a <dog> in a <hat>", num_validation_images=1, validation_inference_steps=1)
    with caplog.at_level("INFO", logger="textual_inversion"):
        train_once(joint_args(tiny_sd, out, listing(tmp_path, two_concepts(photos, other_photos)), **flags, **images))
    dog = json.loads((out / "dog" / "run.json").read_text())["saved"]
    assert dog["learned_embeds.safetensors"] == 1  # its best step; it stopped at step 3
    assert torch.equal(
        rows(out / "dog", "<dog>"), load_file(out / "dog" / "learned_embeds-steps-1.safetensors")["<dog>"]
    )
    frozen = load_file(out / "dog" / "learned_embeds-last.safetensors")["<dog>"]
    assert torch.equal(frozen, load_file(out / "dog" / "learned_embeds-steps-3.safetensors")["<dog>"])
    assert not (out / "dog" / "learned_embeds-steps-4.safetensors").exists()
    assert dog["learned_embeds-last.safetensors"] == 3  # the step its rows froze, not the run's last
    assert json.loads((out / "hat" / "run.json").read_text())["saved"]["learned_embeds.safetensors"] == 6
    grids = {name: sorted(p.name for p in (out / name / "validation").iterdir()) for name in ("dog", "hat")}
    assert grids == {"dog": [f"step-{s}.png" for s in (1, 2, 3)], "hat": [f"step-{s}.png" for s in range(1, 7)]}
    done = next(r.message for r in caplog.records if r.message.startswith("Done"))
    assert "kept <dog> step 1 (stopped early" in done and "<hat> step 6 (the lowest validation loss" in done


def test_a_resumed_run_of_several_concepts_continues_bit_for_bit(tiny_sd, photos, other_photos, tmp_path):
    concepts = listing(tmp_path, two_concepts(photos, other_photos))
    flags = dict(max_train_steps=6, checkpointing_steps=3, validation_steps=2, early_stopping_patience=5)
    train_once(joint_args(tiny_sd, tmp_path / "straight", concepts, **flags))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(tmp_path / "straight" / infer.CONCEPTS_FILE, resumed)
    train_once(joint_args(tiny_sd, resumed, concepts, resume_from_checkpoint="latest", **flags))
    for name, token in (("dog", "<dog>"), ("hat", "<hat>")):
        assert torch.equal(rows(resumed / name, token), rows(tmp_path / "straight" / name, token))


def test_sdxl_trains_several_concepts_into_both_encoders(tiny_sdxl, photos, other_photos, tmp_path):
    out = tmp_path / "out"
    train_once(joint_args(tiny_sdxl, out, listing(tmp_path, two_concepts(photos, other_photos)), max_train_steps=2))
    for name, token, vectors in (("dog", "<dog>", 1), ("hat", "<hat>", 2)):
        first = rows(out / name, token)
        second = load_file(out / name / "learned_embeds_2.safetensors")[token]
        assert (first.shape[0], second.shape[0]) == (vectors, vectors) and first.shape[1] != second.shape[1]
        embedding = infer.read_embedding(out / name)
        assert embedding.token == token and set(embedding.vectors) == {"clip_l", "clip_g"}


def test_the_hub_upload_carries_every_concept_in_its_folder(tiny_sd, photos, other_photos, tmp_path, monkeypatch):
    from test_watch import RecordingHub

    hub = RecordingHub()
    monkeypatch.setattr(ti, "hub_api", hub)
    out = tmp_path / "out"
    concepts = listing(tmp_path, two_concepts(photos, other_photos, validation_prompt="a <dog> in a <hat>"))
    flags = dict(push_to_hub=True, max_train_steps=2, validation_steps=2, num_validation_images=1,
                 validation_inference_steps=1)  # fmt: skip
    train_once(joint_args(tiny_sd, out, concepts, **flags))
    uploaded = Path(next(kw for name, kw in hub.calls if name == "upload_folder")["folder_path"])
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "concepts.json", "dog", "hat", "loss.png"]
    assert {"learned_embeds.safetensors", "token_identifier.txt", "type_of_concept.txt", "validation.png"} <= {
        p.name for p in (uploaded / "dog").iterdir()
    }  # fmt: skip
    assert "validation.png" not in {p.name for p in (uploaded / "hat").iterdir()}  # no prompt of its own
    card = (uploaded / "README.md").read_text()
    assert 'subfolder="dog"' in card and 'subfolder="hat"' in card and "![validation](dog/validation.png)" in card
    from diffusers import StableDiffusionPipeline  # the card's loading code, on the uploaded folder

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_textual_inversion(str(uploaded), subfolder="dog")
    pipe.load_textual_inversion(str(uploaded), subfolder="hat")
    assert {"<dog>", "<hat>", "<hat>_1"} <= set(pipe.tokenizer.get_vocab())


@pytest.mark.slow
def test_two_processes_train_several_concepts_like_one(tiny_sd, photos, other_photos, tmp_path):
    from test_ddp import launch

    concepts = listing(tmp_path, two_concepts(photos, other_photos))
    flags = dict(max_train_steps=3, train_batch_size=1)
    two = launch(joint_args(tiny_sd, tmp_path / "two", concepts, gradient_accumulation_steps=2, **flags), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = launch(joint_args(tiny_sd, tmp_path / "one", concepts, gradient_accumulation_steps=4, **flags), 1)
    assert one.returncode == 0, one.stderr[-3000:]
    for name, token in (("dog", "<dog>"), ("hat", "<hat>")):
        # Same samples, same noise; only the order of the float additions differs.
        torch.testing.assert_close(rows(tmp_path / "two" / name, token), rows(tmp_path / "one" / name, token),
                                   rtol=1e-4, atol=1e-6)  # fmt: skip


def test_validation_scores_score_each_concept_against_its_own_photos(
    tiny_sd, photos, other_photos, tiny_clip, tiny_dino, tmp_path
):
    out = tmp_path / "out"
    concepts = two_concepts(photos, other_photos, validation_prompt="a photo of <dog>")
    concepts[1]["validation_prompt"] = ["a photo of <hat>"]
    flags = dict(validation_scores=True, clip_model=tiny_clip, dino_model=tiny_dino, max_train_steps=1,
                 num_validation_images=2, validation_inference_steps=1)  # fmt: skip
    train_once(joint_args(tiny_sd, out, listing(tmp_path, concepts), **flags))
    (line,) = [r for r in infer.read_jsonl(out / "metrics.jsonl") if r["step"] == 1]
    scorers = infer.Scorers(str(tiny_clip), str(tiny_dino))
    for name, photo_folder, text in (("dog", photos, "a photo of dog"), ("hat", other_photos, "a photo of hat")):
        (tiles,) = infer.grid_tiles(out / name / "validation" / "step-1.png")
        expected = scorers.score(tiles, [text] * 2, infer.read_photos(photo_folder, "photos"))
        for key in ("clip_i", "clip_t", "dino"):
            assert line[f"{key}/{name}"] == pytest.approx(expected[key].double().mean().item(), abs=1e-5)


def test_the_full_pipeline_holds_every_concepts_word(tiny_sd, photos, other_photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    concepts = listing(tmp_path, two_concepts(photos, other_photos))
    train_once(joint_args(tiny_sd, out, concepts, save_as_full_pipeline=True, max_train_steps=1))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    weight = pipe.text_encoder.get_input_embeddings().weight
    for name, token in (("dog", "<dog>"), ("hat", "<hat>")):
        learned = rows(out / name, token)
        ids = pipe.tokenizer.convert_tokens_to_ids(infer.vector_tokens(token, len(learned)))
        assert torch.equal(weight[ids], learned)
