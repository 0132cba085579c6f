"""Single-file models (A1111/ComfyUI .safetensors/.ckpt): the same training as from the diffusers
folder, safe unpickling, one-line errors for files that are not a base model, VAE override."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import RESOLUTION, plan_for, train_args, train_once
from safetensors.torch import load_file, save_file
from test_errors import fails_cleanly
from test_infer import WritesAFile
from test_training import build_stages

import infer
import textual_inversion as ti
from bench.models import build_pipeline, original_layout

MODEL_FLAG = "--pretrained_model_name_or_path"


def model_args(model, config=None, **flags) -> argparse.Namespace:
    """Just the flags load_models reads, parsed as the trainer parses them."""
    argv = train_args(model, "unused", "unused", single_file_config=config, **flags)
    return ti.build_parser().parse_args([str(a) for a in argv])


def load(model, config=None, **flags) -> ti.Models:
    return ti.load_models(model_args(model, config, **flags), torch.device("cpu"), torch.float32)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def previous_run(tmp_path):
    """An output folder holding an earlier run's results, which a failed run must not touch."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "learned_embeds.safetensors").write_bytes(b"earlier result")
    return out


# ----------------------------------------------------------------------------------------
# The test files themselves: diffusers reads them back as the folders they came from.


@pytest.mark.parametrize("layout", ["sd1", "sd2", "xl"])
def test_diffusers_from_single_file_reproduces_the_folder_exactly(layout, request):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(f"tiny_{layout}_layout")
    file = request.getfixturevalue(f"tiny_{layout}_file")
    cls = StableDiffusionXLPipeline if layout == "xl" else StableDiffusionPipeline
    a, b = cls.from_pretrained(folder), cls.from_single_file(str(file), config=str(folder))
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if layout == "xl" else ()):
        assert same_weights(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("layout, kind", [("sd1", "v1"), ("xl", "xl_base")])
def test_the_architecture_is_detected_from_the_file(layout, kind, request):
    folder = request.getfixturevalue(f"tiny_{layout}_layout")
    file = request.getfixturevalue(f"tiny_{layout}_file")
    assert infer.inspect_model_file(file, str(folder), MODEL_FLAG).kind == kind


# ----------------------------------------------------------------------------------------
# Training from a file is training from the folder.


@pytest.mark.parametrize(
    "layout, file_fixture",
    [("sd1", "tiny_sd1_file"), ("sd1", "tiny_sd1_ckpt"), ("sd2", "tiny_sd2_file"), ("xl", "tiny_xl_file")],
    ids=["sd-safetensors", "sd-ckpt", "sd2-v-prediction", "sdxl"],
)
def test_a_run_from_the_file_learns_bit_for_bit_what_the_folder_run_learns(
    layout, file_fixture, photos, tmp_path, request
):
    folder = request.getfixturevalue(f"tiny_{layout}_layout")
    file = request.getfixturevalue(file_fixture)
    flags = dict(resolution=RESOLUTION, max_train_steps=3, num_vectors=2)
    train_once(train_args(folder, photos, tmp_path / "folder", **flags))
    train_once(train_args(file, photos, tmp_path / "file", single_file_config=folder, **flags))
    for name in ("learned_embeds.safetensors",) + (("learned_embeds_2.safetensors",) if layout == "xl" else ()):
        from_folder, from_file = load_file(tmp_path / "folder" / name), load_file(tmp_path / "file" / name)
        assert from_folder.keys() == from_file.keys()
        assert all(torch.equal(from_folder[k], from_file[k]) for k in from_folder), name


@pytest.mark.parametrize("layout", ["sd1", "xl"])
def test_the_file_gives_the_same_components_at_the_same_precisions_as_the_folder(layout, request):
    folder = request.getfixturevalue(f"tiny_{layout}_layout")
    file = request.getfixturevalue(f"tiny_{layout}_file")
    args = model_args(file, folder)
    from_file = ti.load_models(args, torch.device("cpu"), torch.bfloat16)
    from_folder = ti.load_models(model_args(folder), torch.device("cpu"), torch.bfloat16)
    assert from_file.family is from_folder.family
    assert from_file.unet.dtype == torch.bfloat16 and from_file.vae.dtype == torch.float32
    assert [e.dtype for e in from_file.text_encoders] == [torch.bfloat16] * len(from_folder.text_encoders)
    for a, b in zip(
        [from_file.unet, from_file.vae, *from_file.text_encoders],
        [from_folder.unet, from_folder.vae, *from_folder.text_encoders],
    ):
        assert same_weights(a, b)
    assert from_file.noise_scheduler.config == from_folder.noise_scheduler.config


def test_prediction_type_overrides_the_schedulers(tiny_sd1_file, tiny_sd1_layout):
    assert load(tiny_sd1_file, tiny_sd1_layout).noise_scheduler.config.prediction_type == "epsilon"
    models = load(tiny_sd1_file, tiny_sd1_layout, prediction_type="v_prediction")
    assert models.noise_scheduler.config.prediction_type == "v_prediction"
    pipe = infer.load_pipeline(
        str(tiny_sd1_file), single_file_config=str(tiny_sd1_layout), prediction_type="v_prediction"
    )
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_full_pipeline_from_a_file_holds_its_weights_and_the_new_word(tiny_sd1_file, tiny_sd1_layout, photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    train_once(
        train_args(
            tiny_sd1_file,
            photos,
            out,
            single_file_config=tiny_sd1_layout,
            max_train_steps=1,
            save_as_full_pipeline=True,
        )
    )
    saved = StableDiffusionPipeline.from_pretrained(out)
    assert same_weights(saved.unet, StableDiffusionPipeline.from_pretrained(tiny_sd1_layout).unet)
    assert "<concept>" in saved.tokenizer.get_vocab()


def test_the_model_card_names_the_file_and_loads_it_with_from_single_file(tiny_sd1_file, tiny_sd1_layout):
    args = model_args(tiny_sd1_file, tiny_sd1_layout)
    state = ti.RunState(step=3, seed=0)
    card = ti.model_card("me/concept", args, plan_for(args), state, [])
    assert "base_model:" not in card
    assert 'StableDiffusionPipeline.from_single_file("tiny-sd1.safetensors")' in card


# ----------------------------------------------------------------------------------------
# The VAE override.


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """Another VAE of the same shape (a different seed): as a diffusers folder and as one file."""
    folder = build_pipeline("tiny-sd1-layout", tmp_path_factory.mktemp("other") / "pipe", seed=1)
    prefix = "first_stage_model."
    vae_only = {k.removeprefix(prefix): v for k, v in original_layout(folder).items() if k.startswith(prefix)}
    save_file(vae_only, folder.parent / "vae.safetensors")
    return folder


@pytest.mark.parametrize("given", ["folder", "file"])
def test_the_vae_override_replaces_the_models_vae(given, other_vae, tiny_sd1_file, tiny_sd1_layout):
    from diffusers import AutoencoderKL

    source = other_vae / "vae" if given == "folder" else other_vae.parent / "vae.safetensors"
    models = load(tiny_sd1_file, tiny_sd1_layout, pretrained_vae_model_name_or_path=source)
    expected = AutoencoderKL.from_pretrained(other_vae / "vae")
    assert same_weights(models.vae, expected)
    assert models.vae.dtype == torch.float32
    assert not same_weights(load(tiny_sd1_file, tiny_sd1_layout).vae, expected)


def test_the_override_vae_encodes_the_photos(other_vae, tiny_sd1_layout, photos, tmp_path):
    """The cached latents are those of the pipeline the override VAE comes from."""
    plain = build_stages(tiny_sd1_layout, photos, tmp_path)
    swapped = build_stages(tiny_sd1_layout, photos, tmp_path, pretrained_vae_model_name_or_path=other_vae / "vae")
    own = build_stages(other_vae, photos, tmp_path)
    assert torch.equal(swapped.data.latent_mean, own.data.latent_mean)
    assert not torch.equal(plain.data.latent_mean, swapped.data.latent_mean)


# ----------------------------------------------------------------------------------------
# infer.py takes the same files.


def test_infer_generates_from_a_single_file_what_it_generates_from_the_folder(tiny_sd1_file, tiny_sd1_layout, tmp_path):
    from PIL import Image

    common = [
        "--prompt",
        "a toy",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--seed",
        "3",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    ]
    assert infer.main(["--model", str(tiny_sd1_layout), "--out", str(tmp_path / "folder"), *common]) == 0
    argv = ["--model", str(tiny_sd1_file), "--single_file_config", str(tiny_sd1_layout), *common]
    assert infer.main([*argv, "--out", str(tmp_path / "file")]) == 0
    (a,), (b,) = sorted((tmp_path / "folder").glob("0*.png")), sorted((tmp_path / "file").glob("0*.png"))
    assert Image.open(a).tobytes() == Image.open(b).tobytes()


# ----------------------------------------------------------------------------------------
# Safety: a pickle that needs more than tensors is refused before anything in it runs.


def test_a_malicious_ckpt_is_refused_and_nothing_in_it_runs(tiny_sd1_layout, photos, previous_run, tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "model.ckpt"
    state = original_layout(tiny_sd1_layout)
    state["model.diffusion_model.extra"] = WritesAFile(marker)
    torch.save({"state_dict": state}, evil)
    argv = train_args(evil, photos, previous_run, single_file_config=tiny_sd1_layout)
    fails_cleanly(capsys, argv, "refused model.ckpt: it is a pickle that needs the Python object", previous_run)
    assert not marker.exists()


def test_infer_refuses_a_malicious_ckpt_too(tiny_sd1_layout, tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    torch.save({"state_dict": {"x": WritesAFile(marker)}}, tmp_path / "model.ckpt")
    argv = ["--model", str(tmp_path / "model.ckpt"), "--single_file_config", str(tiny_sd1_layout), "--prompt", "x"]
    assert infer.main([*argv, "--out", str(tmp_path / "images")]) == 2
    assert "refused model.ckpt" in capsys.readouterr().err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# Files that are not a base model this trains: one line naming the file and what it is.


def header_copy(source, target, change: dict) -> object:
    """A copy of an original-layout file with some tensors replaced or added (zeros of a shape)."""
    state = load_file(source)
    for key, shape in change.items():
        if shape is None:
            del state[key]
        else:
            state[key] = torch.zeros(shape)
    save_file(state, target)
    return target


def test_a_lora_given_as_the_model_is_named(tiny_sd1_layout, photos, previous_run, tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        lora,
    )
    argv = train_args(lora, photos, previous_run, single_file_config=tiny_sd1_layout)
    fails_cleanly(capsys, argv, f"{MODEL_FLAG} {lora}: is a LoRA, not a base model", previous_run)


def test_a_lycoris_given_as_the_model_is_named(photos, previous_run, tmp_path, capsys):
    loha = tmp_path / "loha.safetensors"
    save_file(
        {"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4), "lora_unet_conv_in.hada_w1_b": torch.zeros(4, 4)}, loha
    )
    fails_cleanly(capsys, train_args(loha, photos, previous_run), "is a LyCORIS (LoHa/LoKr/OFT) file", previous_run)


@pytest.mark.parametrize("layout", ["a1111.pt", "sdxl.safetensors"])
def test_an_embedding_given_as_the_model_is_named(layout, photos, previous_run, tmp_path, capsys):
    path = tmp_path / layout
    if layout.endswith(".pt"):
        infer.write_a1111_embedding(path, "<x>", torch.zeros(2, 32))
    else:
        infer.write_sdxl_embedding(path, torch.zeros(2, 32), torch.zeros(2, 64))
    fails_cleanly(capsys, train_args(path, photos, previous_run), "is a Textual Inversion embedding", previous_run)


def test_an_inpainting_model_is_named(tiny_sd1_file, tiny_sd1_layout, photos, previous_run, tmp_path, capsys):
    inpainting = header_copy(
        tiny_sd1_file,
        tmp_path / "inpaint.safetensors",
        {"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)},
    )
    argv = train_args(inpainting, photos, previous_run, single_file_config=tiny_sd1_layout)
    fails_cleanly(capsys, argv, "is an inpainting model (its UNet takes 9 input channels", previous_run)


def test_an_architecture_this_does_not_train_is_named(photos, previous_run, tmp_path, capsys):
    flux = tmp_path / "flux.safetensors"
    save_file(
        {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(8), "img_in.weight": torch.zeros(8, 64)}, flux
    )
    fails_cleanly(capsys, train_args(flux, photos, previous_run), "is a flux-schnell checkpoint", previous_run)


def test_a_vae_alone_given_as_the_model_is_named(other_vae, photos, previous_run, capsys):
    argv = train_args(other_vae.parent / "vae.safetensors", photos, previous_run)
    fails_cleanly(capsys, argv, "is a VAE alone, not a base model", previous_run)


def test_a_truncated_file_is_named(tiny_sd1_file, tiny_sd1_layout, photos, previous_run, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    data = tiny_sd1_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    argv = train_args(cut, photos, previous_run, single_file_config=tiny_sd1_layout)
    fails_cleanly(capsys, argv, f"{cut}: the file is truncated", previous_run)


def test_a_truncated_ckpt_is_named(tiny_sd1_ckpt, tiny_sd1_layout, photos, previous_run, tmp_path, capsys):
    cut = tmp_path / "cut.ckpt"
    data = tiny_sd1_ckpt.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    argv = train_args(cut, photos, previous_run, single_file_config=tiny_sd1_layout)
    fails_cleanly(
        capsys, argv, "cut.ckpt is neither safetensors nor a readable PyTorch file; is it truncated", previous_run
    )


def test_a_missing_file_is_named(photos, previous_run, tmp_path, capsys):
    argv = train_args(tmp_path / "nope.safetensors", photos, previous_run)
    fails_cleanly(capsys, argv, f"{tmp_path / 'nope.safetensors'}: no such file", previous_run)


def test_a_config_of_another_shape_is_named_with_the_file(tiny_sd1_file, tiny_sd, photos, previous_run, capsys):
    argv = train_args(tiny_sd1_file, photos, previous_run, single_file_config=tiny_sd)
    expected = f"--single_file_config {tiny_sd} does not match {MODEL_FLAG} {tiny_sd1_file}: UNet input blocks"
    fails_cleanly(capsys, argv, expected, previous_run)


def test_a_config_of_another_family_is_named_with_the_file(tiny_xl_file, tiny_sd1_layout, photos, previous_run, capsys):
    argv = train_args(tiny_xl_file, photos, previous_run, single_file_config=tiny_sd1_layout)
    fails_cleanly(capsys, argv, "describes a Stable Diffusion 1.x/2.x pipeline but", previous_run)


def test_without_a_config_offline_the_error_says_to_pass_one(tiny_sd1_file, photos, previous_run, capsys):
    argv = train_args(tiny_sd1_file, photos, previous_run)
    fails_cleanly(capsys, argv, "pass --single_file_config with a local diffusers folder", previous_run)
