"""The files a run leaves in --output_dir, and that diffusers' own loader uses them."""

from __future__ import annotations

import pytest
import torch
from conftest import RESOLUTION, train_args, train_once
from safetensors.torch import load_file


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
