"""The files a run leaves in --output_dir, and that diffusers' own loader uses them."""

from __future__ import annotations

import pytest
import torch
from conftest import RESOLUTION, train_args, train_once
from safetensors.torch import load_file

import infer


@pytest.fixture(scope="module")
def trained(tiny_sd, photos, tmp_path_factory):
    """One SD run, two vectors, embeddings saved every 2 steps."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train_once(train_args(tiny_sd, photos, out, num_vectors=2, max_train_steps=5, save_steps=2))
    return out


def test_learned_embeds_hold_the_token_and_n_float32_rows(trained):
    safetensors_file = load_file(trained / "learned_embeds.safetensors")
    bin_file = torch.load(trained / "learned_embeds.bin", weights_only=True)
    for data in (safetensors_file, bin_file):
        assert list(data) == ["<concept>"]
        assert data["<concept>"].shape == (2, 32) and data["<concept>"].dtype == torch.float32
    assert torch.equal(safetensors_file["<concept>"], bin_file["<concept>"])


def test_token_identifier_and_type_of_concept_are_written(trained):
    assert (trained / "token_identifier.txt").read_text() == "<concept>"
    assert (trained / "type_of_concept.txt").read_text() == "object"


def test_intermediate_embeddings_are_saved_every_save_steps(trained):
    assert sorted(p.name for p in trained.glob("learned_embeds-steps-*")) == [
        "learned_embeds-steps-2.safetensors",
        "learned_embeds-steps-4.safetensors",
    ]


def test_no_temporary_files_are_left_behind(trained):
    assert not [p for p in trained.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_written_files_have_the_usual_permissions(trained):
    assert (trained / "learned_embeds.safetensors").stat().st_mode & 0o044  # readable by others, not 0600


def test_diffusers_load_textual_inversion_reads_the_output_and_generates(trained, tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(trained)
    assert pipe.maybe_convert_prompt("a <concept> toy", pipe.tokenizer) == "a <concept> <concept>_1 toy"
    learned = load_file(trained / "learned_embeds.safetensors")["<concept>"]
    ids = pipe.tokenizer.convert_tokens_to_ids(["<concept>", "<concept>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], learned)
    image = pipe("a <concept> backpack", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="np")
    assert image.images.shape == (1, RESOLUTION, RESOLUTION, 3)


def test_no_safe_serialization_writes_bin_files(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, "--no_safe_serialization", max_train_steps=2, save_steps=1))
    names = sorted(p.name for p in out.glob("learned_embeds*"))
    assert names == ["learned_embeds-steps-1.bin", "learned_embeds-steps-2.bin", "learned_embeds.bin"]


def test_style_concepts_say_so(tiny_sd, photos, tmp_path, run_trainer):
    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, learnable_property="style", max_train_steps=1))
    assert (out / "type_of_concept.txt").read_text() == "style"


# ----------------------------------------------------------------------------------------
# The names, composed and read back by infer.py alone (the trainer, eval and every reader of a
# run's folder agree through it).


def test_the_names_are_diffusers_learned_embeds_with_their_step_and_checkpoint_n():
    assert infer.embeds_name(".safetensors") == "learned_embeds.safetensors"
    assert infer.embeds_name(".bin", infer.steps_tag(12), second=True) == "learned_embeds_2-steps-12.bin"
    assert infer.embeds_name(".safetensors", infer.LAST) == "learned_embeds-last.safetensors"
    assert infer.checkpoint_name(7) == "checkpoint-7"


@pytest.mark.parametrize("step", [0, 5, 12000])
def test_a_steps_file_and_a_checkpoint_read_back_their_step(step):
    for extension in (".safetensors", ".bin"):
        name = infer.embeds_name(extension, infer.steps_tag(step))
        assert int(infer.STEPS_NAME.fullmatch(name)[1]) == int(infer.RUN_EMBEDS_NAME.fullmatch(name)[1]) == step
    assert int(infer.CHECKPOINT_NAME.fullmatch(infer.checkpoint_name(step))[1]) == step


def test_only_the_files_saved_every_save_steps_are_steps_files():
    periodic = [infer.embeds_name(".safetensors", infer.steps_tag(4), second=second) for second in (False, True)]
    results = [infer.embeds_name(".safetensors", tag) for tag in ("", infer.LAST, infer.BEFORE_EVAL)]
    assert [infer.is_steps_file(name) for name in periodic + results] == [True, True, False, False, False]


def test_a_run_reads_back_its_own_embedding_files_and_no_others():
    own = [
        infer.embeds_name(extension, tag)
        for extension in (".safetensors", ".bin")
        for tag in ("", infer.steps_tag(3), infer.LAST, infer.BEFORE_EVAL, infer.LAST + infer.BEFORE_EVAL)
    ]
    others = [
        infer.embeds_name(".safetensors", second=True),  # read with its first half
        infer.embeds_name(".pt"),
        infer.embeds_name(".safetensors", "-mine"),
        "concept.safetensors",
    ]
    assert all(infer.RUN_EMBEDS_NAME.fullmatch(name) for name in own)
    assert not any(infer.RUN_EMBEDS_NAME.fullmatch(name) for name in others)


@pytest.mark.parametrize("tag", ["", "-steps-8", "-last", "-before-eval", "-mine"])
def test_each_half_of_an_sdxl_pair_finds_the_other_whatever_its_tag(tmp_path, tag):
    first, second = (tmp_path / infer.embeds_name(".safetensors", tag, second=s) for s in (False, True))
    first.write_bytes(b"")
    assert infer.with_pair_partner(first) == [first]  # alone, it is a plain SD file
    second.write_bytes(b"")
    assert infer.with_pair_partner(first) == infer.with_pair_partner(second) == [first, second]
