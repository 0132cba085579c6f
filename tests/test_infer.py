"""infer.py: any embedding, from any tool, loads, generates, converts, and fails clearly and safely.

Everything runs offline on the tiny random-weight pipelines of conftest (64x64 images, 2 steps).
Files in other tools' layouts are written here with torch/safetensors, as those tools write them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RESOLUTION, ROOT, train_args, train_once
from PIL import Image
from safetensors.torch import load_file, save_file

import infer

STEPS = 2


# ----------------------------------------------------------------------------------------
# Helpers and fixtures.


def vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def train(model: Path, photos: Path, out: Path, **flags) -> Path:
    """The real trainer, in this process, so "our output folder" is what users really get."""
    train_once(train_args(model, photos, out, **flags))
    return out


@pytest.fixture(scope="module")
def trained_sd(tiny_sd, photos, tmp_path_factory) -> Path:
    """A two-vector SD output folder, saved with --save_as_full_pipeline."""
    return train(tiny_sd, photos, tmp_path_factory.mktemp("ti_sd") / "out", num_vectors=2, save_as_full_pipeline=True)


@pytest.fixture(scope="module")
def trained_sdxl(tiny_sdxl, photos, tmp_path_factory) -> Path:
    return train(tiny_sdxl, photos, tmp_path_factory.mktemp("ti_sdxl") / "out", placeholder_token="<cat-toy>")


@pytest.fixture
def sd_pipe(tiny_sd):
    return infer.load_pipeline(str(tiny_sd))


@pytest.fixture
def sdxl_pipe(tiny_sdxl):
    return infer.load_pipeline(str(tiny_sdxl))


def rows_in(pipe, tokens: list[str]) -> dict[str, torch.Tensor]:
    """{slot: the text encoder rows of these tokens}: what the pipeline actually holds."""
    found = {}
    for slot, tokenizer, encoder in infer.text_encoder_slots(pipe):
        ids = tokenizer.convert_tokens_to_ids(tokens)
        found[slot] = encoder.get_input_embeddings().weight[ids].detach()
    return found


def make_image(pipe, prompt: str, seed: int = 0, **options) -> np.ndarray:
    (image,) = infer.generate(pipe, prompt, seeds=[seed], steps=STEPS, height=RESOLUTION, width=RESOLUTION, **options)
    return np.asarray(image)


def cli(*argv: str) -> int:
    return infer.main([str(a) for a in argv])


def generate_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", model, "--out", out, "--steps", STEPS, "--height", RESOLUTION, "--width", RESOLUTION, *extra,
    ]  # fmt: skip


class WritesAFile:
    """A pickle payload: unpickling it calls exec, which writes `path`. Real attacks look like this."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache holding `repo_id` as a download would leave it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return root


# ----------------------------------------------------------------------------------------
# Every source kind loads and generates. Each builder writes SRC the way its tool does and
# returns (src, --token or None, expected token, expected {slot: vectors}).


def src_our_sd_folder(tmp, trained_sd, trained_sdxl):
    return trained_sd, None, "<concept>", {"clip_l": load_file(trained_sd / "learned_embeds.safetensors")["<concept>"]}


def src_our_sd_bin_file(tmp, trained_sd, trained_sdxl):
    expected = {"clip_l": load_file(trained_sd / "learned_embeds.safetensors")["<concept>"]}
    return trained_sd / "learned_embeds.bin", None, "<concept>", expected


def src_diffusers_safetensors(tmp, trained_sd, trained_sdxl):
    save_file({"<my-thing>": vectors(3, 32)}, tmp / "my_thing.safetensors")
    return tmp / "my_thing.safetensors", None, "<my-thing>", {"clip_l": vectors(3, 32)}


def src_sd_concepts_1d_bin(tmp, trained_sd, trained_sdxl):
    """Early sd-concepts-library files hold one vector as a 1-D tensor."""
    torch.save({"<old-style>": vectors(1, 32)[0]}, tmp / "learned_embeds.bin")
    return tmp / "learned_embeds.bin", None, "<old-style>", {"clip_l": vectors(1, 32)}


def src_a1111_pt(tmp, trained_sd, trained_sdxl):
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors(4, 32).requires_grad_()},
        "name": "charturner",
        "step": 1500,
        "sd_checkpoint": "a9263745",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    torch.save(data, tmp / "charturner.pt")
    return tmp / "charturner.pt", None, "charturner", {"clip_l": vectors(4, 32)}


def src_original_ti_pt_with_parameterdict(tmp, trained_sd, trained_sdxl):
    """The 2022 textual_inversion code saved a torch.nn.ParameterDict."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(2, 32))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp / "ldm.pt")
    return tmp / "ldm.pt", None, "ldm", {"clip_l": vectors(2, 32)}


def src_kohya_emb_params(tmp, trained_sd, trained_sdxl):
    save_file({"emb_params": vectors(2, 32)}, tmp / "kohya-concept.safetensors")
    return tmp / "kohya-concept.safetensors", None, "kohya-concept", {"clip_l": vectors(2, 32)}


def src_onetrainer_emp_params_renamed(tmp, trained_sd, trained_sdxl):
    save_file({"emp_params": vectors(2, 32)}, tmp / "ot.safetensors")
    return tmp / "ot.safetensors", "<onetrainer>", "<onetrainer>", {"clip_l": vectors(2, 32)}


def src_our_sd_folder_on_v_prediction_base(tmp, trained_sd, trained_sdxl):
    return src_our_sd_folder(tmp, trained_sd, trained_sdxl)


def src_our_sdxl_folder(tmp, trained_sd, trained_sdxl):
    first = load_file(trained_sdxl / "learned_embeds.safetensors")["<cat-toy>"]
    second = load_file(trained_sdxl / "learned_embeds_2.safetensors")["<cat-toy>"]
    return trained_sdxl, None, "<cat-toy>", {"clip_l": first, "clip_g": second}


def src_our_sdxl_single_file(tmp, trained_sd, trained_sdxl):
    """Named cat-toy.safetensors; its token_identifier.txt gives back '<cat-toy>'."""
    data = load_file(trained_sdxl / "cat-toy.safetensors")
    return trained_sdxl / "cat-toy.safetensors", None, "<cat-toy>", dict(data)


def src_diffusers_sdxl_pair_by_second_file(tmp, trained_sd, trained_sdxl):
    _, _, token, expected = src_our_sdxl_folder(tmp, trained_sd, trained_sdxl)
    return trained_sdxl / "learned_embeds_2.safetensors", None, token, expected


def src_sdxl_clip_l_clip_g_from_another_tool(tmp, trained_sd, trained_sdxl):
    save_file({"clip_l": vectors(2, 32, 1), "clip_g": vectors(2, 64, 2)}, tmp / "xl-style.safetensors")
    return tmp / "xl-style.safetensors", None, "xl-style", {"clip_l": vectors(2, 32, 1), "clip_g": vectors(2, 64, 2)}


SOURCES = {
    "our SD output folder": ("tiny_sd", src_our_sd_folder),
    "our SD .bin file": ("tiny_sd", src_our_sd_bin_file),
    "diffusers .safetensors": ("tiny_sd", src_diffusers_safetensors),
    "sd-concepts 1-D .bin": ("tiny_sd", src_sd_concepts_1d_bin),
    "A1111 .pt": ("tiny_sd", src_a1111_pt),
    "original TI .pt (ParameterDict)": ("tiny_sd", src_original_ti_pt_with_parameterdict),
    "kohya emb_params": ("tiny_sd", src_kohya_emb_params),
    "OneTrainer emp_params + --token": ("tiny_sd", src_onetrainer_emp_params_renamed),
    "SD 2.x-style v-prediction base": ("tiny_sd_v", src_our_sd_folder_on_v_prediction_base),
    "our SDXL output folder": ("tiny_sdxl", src_our_sdxl_folder),
    "our SDXL clip_l/clip_g file": ("tiny_sdxl", src_our_sdxl_single_file),
    "diffusers SDXL pair (second file given)": ("tiny_sdxl", src_diffusers_sdxl_pair_by_second_file),
    "SDXL clip_l/clip_g from another tool": ("tiny_sdxl", src_sdxl_clip_l_clip_g_from_another_tool),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_source_kind_loads_and_generates(kind, request, tmp_path, trained_sd, trained_sdxl):
    base, build = SOURCES[kind]
    src, token, expected_token, expected = build(tmp_path, trained_sd, trained_sdxl)
    pipe = infer.load_pipeline(str(request.getfixturevalue(base)))

    tokens = infer.load_embedding(pipe, src, token=token)

    n = next(iter(expected.values())).shape[0]
    assert tokens == [expected_token] + [f"{expected_token}_{i}" for i in range(1, n)]
    held = rows_in(pipe, tokens)
    assert held.keys() == expected.keys()
    for slot in expected:
        assert torch.equal(held[slot], expected[slot].float())
    assert make_image(pipe, f"a {expected_token} backpack").shape == (RESOLUTION, RESOLUTION, 3)


def test_hub_repo_id_is_fetched_through_the_hugging_face_cache(tiny_sd, tmp_path):
    """The Hub cannot be reached from tests, so the cache is filled as a download leaves it
    (models--org--name/refs/main + snapshots/<commit>/) and the real CLI runs with
    HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it: the same huggingface_hub code path a user
    takes the second time, with nothing mocked."""
    embedding = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": vectors(1, 32)[0]}, embedding)
    cache = hub_cache(
        tmp_path / "hf",
        "sd-concepts-library/cat-toy",
        {"learned_embeds.bin": embedding.read_bytes(), "token_identifier.txt": b"<cat-toy>"},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    argv = generate_argv(tiny_sd, tmp_path / "out", "--embedding", "sd-concepts-library/cat-toy")
    argv += ["--prompt", "a <cat-toy> backpack", "--seed", "1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *map(str, argv)], check=False, env=env, capture_output=True, text=True
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "out" / "00000-1.png"), str(tmp_path / "out" / "grid.png")]
    assert "loaded <cat-toy> (1 vector, diffusers) from sd-concepts-library/cat-toy" in done.stderr
    meta = infer.read_png_settings(tmp_path / "out" / "00000-1.png")
    assert meta["embeddings"][0]["sha256"] == [hashlib.sha256(embedding.read_bytes()).hexdigest()]


def test_hub_listing_downloads_only_small_embedding_files(monkeypatch, tmp_path):
    """Online, a repo id given by mistake for a whole model must not fetch gigabytes of weights."""
    import huggingface_hub
    from huggingface_hub.hf_api import RepoFile

    entries = [
        RepoFile(path="sd_xl_base_1.0.safetensors", size=6_938_078_334, oid="a"),
        RepoFile(path="concept.safetensors", size=1_000, oid="b"),
        RepoFile(path="README.md", size=100, oid="c"),
    ]
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    save_file({"emb_params": vectors(1, 32)}, snapshot / "concept.safetensors")
    requested = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        requested.update(repo_id=repo_id, allow=allow_patterns, ignore=ignore_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", lambda self, repo_id, **kw: iter(entries))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)

    emb = infer.read_embedding("someone/model-with-a-concept")

    assert requested["allow"] == ["concept.safetensors", "token_identifier.txt"]
    assert requested["ignore"] == ["*/*"]  # nothing from the model's subfolders either
    assert emb.token == "concept" and torch.equal(emb.vectors["clip_l"], vectors(1, 32))


def test_hub_id_that_cannot_be_fetched_says_so():
    with pytest.raises(infer.UserError, match="not a local file or folder, and the Hugging Face Hub could not"):
        infer.read_embedding("nobody-here/no-such-concept")


def test_folder_with_several_embedding_files_asks_for_one(tmp_path):
    save_file({"a": vectors(1, 32)}, tmp_path / "one.safetensors")
    save_file({"b": vectors(1, 32)}, tmp_path / "two.safetensors")
    with pytest.raises(infer.UserError, match=r"holds 2 embedding files \(one.safetensors, two.safetensors\)"):
        infer.read_embedding(tmp_path)


def test_a_lora_or_model_file_is_not_taken_for_an_embedding(tmp_path):
    save_file({f"lora_unet_block_{i}.weight": torch.zeros(2, 2) for i in range(8)}, tmp_path / "lora.safetensors")
    with pytest.raises(infer.UserError, match="looks like a LoRA or a model"):
        infer.read_embedding(tmp_path / "lora.safetensors")


# ----------------------------------------------------------------------------------------
# Matching diffusers: the same tokens, rows and prompt expansion.


def test_loading_matches_diffusers_load_textual_inversion(trained_sd, tiny_sd, sd_pipe):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    reference.load_textual_inversion(trained_sd)

    tokens = infer.load_embedding(sd_pipe, trained_sd)

    assert sd_pipe.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    assert torch.equal(
        sd_pipe.text_encoder.get_input_embeddings().weight, reference.text_encoder.get_input_embeddings().weight
    )
    prompt = "a <concept> backpack"
    assert sd_pipe.maybe_convert_prompt(prompt, sd_pipe.tokenizer) == "a <concept> <concept>_1 backpack"
    assert sd_pipe.maybe_convert_prompt(prompt, sd_pipe.tokenizer) == reference.maybe_convert_prompt(
        prompt, reference.tokenizer
    )
    assert tokens == ["<concept>", "<concept>_1"]


def test_sdxl_tokens_go_into_both_tokenizers_and_expand_in_both(tmp_path, sdxl_pipe):
    save_file({"clip_l": vectors(3, 32), "clip_g": vectors(3, 64)}, tmp_path / "multi.safetensors")

    tokens = infer.load_embedding(sdxl_pipe, tmp_path / "multi.safetensors", token="<multi>")

    for tokenizer in (sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2):
        assert sdxl_pipe.maybe_convert_prompt("a <multi>", tokenizer) == "a <multi> <multi>_1 <multi>_2"
        assert tokenizer.convert_tokens_to_ids(tokens) == list(range(len(tokenizer) - 3, len(tokenizer)))


def test_capitalised_multi_vector_token_uses_all_its_vectors_in_any_case(tmp_path, sd_pipe):
    """diffusers alone would expand 'EasyNeg' to nothing and use its first vector only."""
    torch.save({"string_to_param": {"*": vectors(3, 32)}, "name": "EasyNeg"}, tmp_path / "easyneg.pt")

    tokens = infer.load_embedding(sd_pipe, tmp_path / "easyneg.pt")

    ids = sd_pipe.tokenizer.convert_tokens_to_ids(tokens)
    for written in ("EasyNeg", "easyneg", "EASYNEG"):
        prompt = sd_pipe.maybe_convert_prompt(infer.normalize_prompt(sd_pipe, f"blurry, {written}"), sd_pipe.tokenizer)
        assert [i for i in sd_pipe.tokenizer(prompt).input_ids if i in ids] == ids


def test_trainer_full_pipeline_holds_the_word(trained_sd):
    """--save_as_full_pipeline goes through load_embedding: the saved pipeline knows the word."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(trained_sd)
    learned = load_file(trained_sd / "learned_embeds.safetensors")["<concept>"]
    assert torch.equal(rows_in(pipe, ["<concept>", "<concept>_1"])["clip_l"], learned)


# ----------------------------------------------------------------------------------------
# Generation: reproducible, recorded, tiled.


def test_same_seed_gives_the_same_image(trained_sd, tiny_sd, tmp_path):
    for out in ("a", "b"):
        argv = generate_argv(tiny_sd, tmp_path / out, "--embedding", trained_sd, "--prompt", "a <concept>", "--seed", 7)
        assert cli(*argv) == 0
    first, second = (np.asarray(Image.open(tmp_path / out / "00000-7.png")) for out in ("a", "b"))
    assert np.array_equal(first, second)


def test_image_k_can_be_made_again_alone_from_seed_plus_k(trained_sd, sd_pipe):
    infer.load_embedding(sd_pipe, trained_sd)
    images = infer.generate(sd_pipe, "a <concept>", seeds=[10, 11], steps=STEPS, height=RESOLUTION, width=RESOLUTION)
    assert np.array_equal(np.asarray(images[1]), make_image(sd_pipe, "a <concept>", seed=11))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def parse_a1111_infotext(text: str) -> dict[str, str]:
    """A "parameters" text read the way A1111's PNG Info reads it (its grammar, written out here):
    the last line holds the settings if it has at least three `Key: value` pairs, separated by
    commas, a value being text up to the next comma or a JSON string in double quotes; the lines
    before are the prompt, up to a line starting "Negative prompt:", and then the negative prompt."""
    pair = re.compile(r'(\w[\w /-]*?):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,\s*|$)')
    *lines, last = text.strip().split("\n")
    pairs = pair.findall(last)
    if len(pairs) < 3:
        lines, pairs = [*lines, last], []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        in_negative = in_negative or line.startswith("Negative prompt:")
        (negative if in_negative else prompt).append(line.removeprefix("Negative prompt:").strip())
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return fields


def test_a_second_run_into_the_same_folder_numbers_its_images_and_its_grid(trained_sd, tiny_sd, tmp_path, capsys):
    argv = generate_argv(tiny_sd, tmp_path, "--embedding", trained_sd, "--prompt", "a <concept> backpack")
    assert cli(*argv, "--num_images", 2, "--seed", 1) == 0
    first_grid = (tmp_path / "grid.png").read_bytes()
    assert cli(*argv, "--seed", 9) == 0

    printed = capsys.readouterr().out.split()
    names = ["00000-1.png", "00001-2.png", "grid.png", "00002-9.png", "grid-00002.png"]
    assert printed == [str(tmp_path / name) for name in names]
    assert (tmp_path / "grid.png").read_bytes() == first_grid
    assert infer.read_png_settings(tmp_path / "grid-00002.png")["seeds"] == [9]
    assert cli(*argv, "--seed", 4) == 0  # and on: numbered after the grid's number too
    assert capsys.readouterr().out.split() == [str(tmp_path / "00003-4.png"), str(tmp_path / "grid-00003.png")]


def test_pngs_record_their_parameters_and_a_grid_tiles_them(trained_sd, tiny_sd, tmp_path, capsys):
    argv = generate_argv(tiny_sd, tmp_path, "--embedding", trained_sd, "--prompt", "a <concept> backpack")
    argv += ["--negative_prompt", "blurry", "--num_images", 3, "--seed", 5, "--scheduler", "euler"]
    assert cli(*argv) == 0

    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / n) for n in ("00000-5.png", "00001-6.png", "00002-7.png", "grid.png")]
    sha256 = hashlib.sha256((trained_sd / "learned_embeds.safetensors").read_bytes()).hexdigest()
    assert infer.read_png_settings(tmp_path / "00001-6.png") == {
        "prompt": "a <concept> backpack",
        "negative_prompt": "blurry",
        "seed": 6,
        "steps": STEPS,
        "guidance_scale": 7.5,
        "scheduler": "euler",
        "sampler": "Euler",
        "schedule_type": "Uniform",
        "width": RESOLUTION,
        "height": RESOLUTION,
        "model": str(tiny_sd),
        "dtype": "float32",
        "embeddings": [
            {
                "token": "<concept>",
                "vectors": 2,
                "source": str(trained_sd),
                "sha256": [sha256],
                "name": "<concept>",
                "hash": sha256[:12],
            }
        ],
    }
    a1111 = parse_a1111_infotext(Image.open(tmp_path / "00001-6.png").text["parameters"])
    assert a1111 == {
        "Prompt": "a <concept> backpack",
        "Negative prompt": "blurry",
        "Steps": str(STEPS),
        "Sampler": "Euler",
        "Schedule type": "Uniform",
        "CFG scale": "7.5",
        "Seed": "6",
        "Size": f"{RESOLUTION}x{RESOLUTION}",
        "Model": tiny_sd.name,
        "TI hashes": f"<concept>: {sha256[:12]}",
    }
    assert parse_a1111_infotext(Image.open(tmp_path / "grid.png").text["parameters"])["Seed"] == "5"
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * RESOLUTION, 2 * RESOLUTION)  # 3 images: 2 columns, 2 rows
    assert np.array_equal(np.asarray(grid)[:RESOLUTION, RESOLUTION:], np.asarray(Image.open(tmp_path / "00001-6.png")))


def test_a1111_infotext_lines_quote_what_holds_commas_and_count_clip_skip_from_one():
    settings = {
        "prompt": "a <concept>, on a beach",
        "negative_prompt": "blurry, easyneg",
        "seed": 5,
        "steps": 30,
        "guidance_scale": 7.5,
        "sampler": "DPM++ 2M",
        "schedule_type": "Uniform",
        "width": 512,
        "height": 768,
        "model": "/models/myFinetune.safetensors",
        "clip_skip": 1,
        "embeddings": [{"name": "charturnerv2", "hash": "0123456789ab"}, {"name": "easy:neg,x", "hash": "ba98765432"}],
    }
    text = infer.a1111_parameters(settings)

    assert text.split("\n") == [
        "a <concept>, on a beach",
        "Negative prompt: blurry, easyneg",
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale: 7.5, Seed: 5, Size: 512x768, "
        'Model: myFinetune, Clip skip: 2, TI hashes: "charturnerv2: 0123456789ab, easynegx: ba98765432"',
    ]  # A1111 drops ":" and "," from names in TI hashes
    parsed = parse_a1111_infotext(text)
    assert parsed["Prompt"] == "a <concept>, on a beach" and parsed["Negative prompt"] == "blurry, easyneg"
    assert parsed["Clip skip"] == "2" and parsed["TI hashes"] == "charturnerv2: 0123456789ab, easynegx: ba98765432"


def test_the_full_settings_json_round_trips_under_its_own_png_key(tmp_path):
    settings = {"prompt": "ünïcode, <concept>", "negative_prompt": "", "seeds": [3, 4], "steps": 2,
                "guidance_scale": 5.0, "sampler": "DDIM", "width": 8, "height": 8, "model": "org/name",
                "embeddings": [], "anything": {"nested": [1, 2.5, None]}}  # fmt: skip
    infer.write_png(tmp_path / "x.png", Image.new("RGB", (8, 8)), settings)

    assert infer.read_png_settings(tmp_path / "x.png") == settings
    assert Image.open(tmp_path / "x.png").text["parameters"].splitlines() == [
        "ünïcode, <concept>",
        "Steps: 2, Sampler: DDIM, CFG scale: 5.0, Seed: 3, Size: 8x8, Model: name",
    ]
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert infer.read_png_settings(tmp_path / "plain.png") is None


def test_a_second_run_numbers_on_instead_of_overwriting(trained_sd, tiny_sd, tmp_path, capsys):
    for _ in range(2):
        argv = generate_argv(tiny_sd, tmp_path, "--embedding", trained_sd, "--prompt", "a <concept>", "--seed", 1)
        assert cli(*argv) == 0
    assert sorted(p.name for p in tmp_path.glob("0*.png")) == ["00000-1.png", "00001-1.png"]


@pytest.mark.parametrize(
    "name, cls",
    [
        ("dpm++", "DPMSolverMultistepScheduler"),
        ("euler", "EulerDiscreteScheduler"),
        ("euler_a", "EulerAncestralDiscreteScheduler"),
        ("ddim", "DDIMScheduler"),
    ],
)
def test_each_scheduler_generates(name, cls, sd_pipe):
    infer.set_scheduler(sd_pipe, name)
    assert type(sd_pipe.scheduler).__name__ == cls
    if name == "dpm++":
        assert sd_pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert make_image(sd_pipe, "a toy").shape == (RESOLUTION, RESOLUTION, 3)


def test_negative_embedding_token_in_negative_prompt_counts_as_used(trained_sd, tiny_sd, tmp_path, capsys):
    save_file({"emb_params": vectors(2, 32)}, tmp_path / "bad-hands.safetensors")
    argv = generate_argv(
        tiny_sd, tmp_path / "out", "--embedding", trained_sd, "--embedding", tmp_path / "bad-hands.safetensors"
    )
    argv += ["--prompt", "a <concept>", "--negative_prompt", "bad-hands"]
    assert cli(*argv) == 0
    err = capsys.readouterr().err
    assert "loaded bad-hands (2 vectors, kohya)" in err
    assert "warning" not in err


def test_repeated_token_flags_rename_the_embeddings_in_order(trained_sd, tiny_sd, tmp_path, capsys):
    """--token "" keeps the first embedding's own token; the second --token renames the second."""
    argv = generate_argv(tiny_sd, tmp_path / "out", "--embedding", trained_sd, "--embedding", trained_sd)
    argv += ["--token", "", "--token", "<again>", "--prompt", "<concept> and <again>"]
    assert cli(*argv) == 0
    err = capsys.readouterr().err
    assert "loaded <concept> (2 vectors" in err and "loaded <again> (2 vectors" in err


def test_prompt_that_never_uses_a_loaded_token_gets_one_warning(trained_sd, tiny_sd, tmp_path, capsys):
    argv = generate_argv(tiny_sd, tmp_path, "--embedding", trained_sd, "--prompt", "a toy backpack")
    assert cli(*argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: neither --prompt nor --negative_prompt uses '<concept>', so that embedding does nothing"
    ]


def test_device_auto_is_cpu_here_and_dtype_auto_is_fp16_only_on_cuda():
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert infer.pick_device("auto") == torch.device("cpu")
    assert infer.pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert infer.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert infer.pick_dtype("auto", torch.device("mps")) == torch.float32


# ----------------------------------------------------------------------------------------
# Calling an embedding by its file name, as A1111 and ComfyUI do.


def a1111_file(path: Path, name: str, n: int = 4, seed: int = 0) -> Path:
    """An A1111 .pt whose "name" field is `name`, saved under another file name, as A1111 users share them."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(n, 32, seed)}, "name": name, "step": 100}
    torch.save(data, path)
    return path


def test_an_a1111_file_answers_to_its_file_name_as_well_as_its_name_field(tmp_path, sd_pipe):
    src = a1111_file(tmp_path / "charturnerv2.pt", "charturner")

    tokens = infer.load_embedding(sd_pipe, src)

    assert tokens[0] == "charturner"
    for written in ("charturnerv2, a knight", "CharTurnerV2, a knight", "embedding:charturnerv2, a knight"):
        assert infer.normalize_prompt(sd_pipe, written) == "charturner, a knight"
    assert infer.unused_tokens(sd_pipe, tokens[:1], "charturnerv2, a knight") == []
    assert np.array_equal(make_image(sd_pipe, "charturnerv2, a knight"), make_image(sd_pipe, "charturner, a knight"))


def test_a_file_name_alias_is_matched_as_a_whole_word_and_never_inside_the_token(trained_sd, tmp_path, sd_pipe):
    """Our own folder converted for A1111 is concept.pt holding "<concept>": both words call it."""
    (src,) = infer.convert_embedding(trained_sd, tmp_path, "a1111")
    assert src.name == "concept.pt"

    infer.load_embedding(sd_pipe, src)

    assert infer.normalize_prompt(sd_pipe, "a <concept> and concept, concepts") == "a <concept> and <concept>, concepts"


def test_a_file_name_that_is_a_known_word_keeps_its_meaning_with_a_warning(tmp_path, sd_pipe, caplog):
    src = a1111_file(tmp_path / "toy.pt", "<my-toy>")

    infer.load_embedding(sd_pipe, src)

    assert infer.normalize_prompt(sd_pipe, "a toy") == "a toy"
    assert f"{src}: its file name 'toy' already means something in prompts; call this embedding '<my-toy>'" in (
        caplog.text
    )


def test_renaming_with_token_drops_the_file_name(tmp_path):
    src = a1111_file(tmp_path / "charturnerv2.pt", "charturner")
    assert infer.read_embedding(src).aliases == ("charturnerv2",)
    assert infer.read_embedding(src, token="<turner>").aliases == ()


def test_the_command_line_takes_an_a1111_file_by_its_file_name(tiny_sd, tmp_path, sd_pipe):
    src = a1111_file(tmp_path / "charturnerv2.pt", "charturner")
    argv = generate_argv(tiny_sd, tmp_path / "out", "--embedding", src, "--prompt", "charturnerv2, a knight")
    done = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *map(str, [*argv, "--seed", 3])],
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stderr
    assert f"loaded charturner (4 vectors, A1111) from {src}; also answers to charturnerv2" in done.stderr
    assert "warning" not in done.stderr
    png = Image.open(tmp_path / "out" / "00000-3.png")
    sha256 = hashlib.sha256(src.read_bytes()).hexdigest()
    assert parse_a1111_infotext(png.text["parameters"])["TI hashes"] == f"charturnerv2: {sha256[:12]}"
    infer.set_scheduler(sd_pipe, "dpm++")
    infer.load_embedding(sd_pipe, src)
    assert np.array_equal(np.asarray(png.convert("RGB")), make_image(sd_pipe, "charturner, a knight", seed=3))


# ----------------------------------------------------------------------------------------
# A run stopped before its end has no learned_embeds: its newest rows are used, and named.


@pytest.fixture(scope="module")
def stopped_run(tiny_sd, photos, tmp_path_factory) -> Path:
    """A 7-step run with learned_embeds-steps-3/-6 and checkpoint-4, its final files then
    removed: what the folder holds when a run is stopped before its end."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    train(tiny_sd, photos, out, max_train_steps=7, save_steps=3, checkpointing_steps=4)
    for name in ("learned_embeds.safetensors", "learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt"):
        (out / name).unlink()
    return out


def test_a_stopped_runs_folder_gives_its_newest_saved_rows_and_names_them(stopped_run, caplog):
    emb = infer.read_embedding(stopped_run)

    newest = stopped_run / "learned_embeds-steps-6.safetensors"
    assert emb.files == [newest]
    assert torch.equal(emb.vectors["clip_l"], load_file(newest)["<concept>"])
    assert f"using its newest rows, step 6: {newest}" in caplog.text


def test_a_newer_checkpoint_wins_over_older_steps_files(stopped_run, tmp_path, caplog):
    import shutil

    folder = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    (folder / "learned_embeds-steps-6.safetensors").unlink()

    emb = infer.read_embedding(folder)

    checkpoint = folder / "checkpoint-4" / "learned_embeds.safetensors"
    assert emb.files == [checkpoint] and emb.token == "<concept>"
    assert f"using its newest rows, step 4: {checkpoint}" in caplog.text


def test_the_command_line_generates_from_a_stopped_run_and_says_which_step(stopped_run, tiny_sd, tmp_path, capsys):
    argv = generate_argv(tiny_sd, tmp_path, "--embedding", stopped_run, "--prompt", "a <concept>", "--seed", 1)
    assert cli(*argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {stopped_run} has no learned_embeds file (a stopped run?); using its newest rows, step 6: "
        f"{stopped_run / 'learned_embeds-steps-6.safetensors'}"
    ]


def test_a_finished_runs_folder_reads_its_learned_embeds_as_before(trained_sd, caplog):
    assert infer.read_embedding(trained_sd).files == [trained_sd / "learned_embeds.safetensors"]
    assert "newest rows" not in caplog.text


# ----------------------------------------------------------------------------------------
# Safety: an untrusted pickle is never run.


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_nothing_in_it_runs(writer, tmp_path):
    marker = tmp_path / "pwned.txt"
    payload = {"<evil>": vectors(1, 32), "extra": WritesAFile(marker)}
    evil = tmp_path / "evil.bin"
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(payload, f)
    control = tmp_path / "control.txt"  # the payload is live: plain unpickling runs it
    pickle.loads(pickle.dumps(WritesAFile(control)))
    assert control.exists()

    with pytest.raises(infer.UserError, match=r"refused evil.bin: it is a pickle .* nothing in it was run"):
        infer.read_embedding(evil)
    assert not marker.exists()


def test_refusal_names_the_object_the_pickle_needed(tmp_path):
    torch.save({"<evil>": WritesAFile(tmp_path / "pwned.txt")}, tmp_path / "evil.pt")
    with pytest.raises(infer.UserError, match=r"needs the Python object \S*exec to load, not just tensors"):
        infer.read_embedding(tmp_path / "evil.pt")


def test_malicious_pickle_on_the_command_line_is_one_error_line_and_exit_2(tiny_sd, tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    torch.save({"string_to_param": {"*": WritesAFile(marker)}, "name": "x"}, tmp_path / "evil.pt")

    code = cli(*generate_argv(tiny_sd, tmp_path, "--embedding", tmp_path / "evil.pt", "--prompt", "x"))

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'evil.pt'}: refused evil.pt")
    assert "Traceback" not in err and "safetensors" in err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# Models: the family read from the model index, and weights the same wherever they came from.


def test_a_model_index_names_its_family_and_an_sdxl_one_is_not_taken_for_sd(tiny_sd, tiny_sdxl, sd_pipe, sdxl_pipe):
    assert infer.find_model(str(tiny_sd)).family is infer.StableDiffusion
    assert infer.find_model(str(tiny_sdxl)).family is infer.StableDiffusionXL
    assert infer.family_of_pipeline(sd_pipe) is infer.StableDiffusion
    assert infer.family_of_pipeline(sdxl_pipe) is infer.StableDiffusionXL


def test_an_index_lacking_a_component_of_every_family_is_refused_naming_it(tiny_sdxl):
    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]  # as an SDXL refiner's index has them
    with pytest.raises(infer.UserError, match=r"^--model refiner: StableDiffusionXLPipeline \(.*\) is not a Stable"):
        infer.family_of_index(index, "--model refiner")


def test_every_family_has_one_tokenizer_class_and_slot_per_text_encoder():
    assert len({family.name for family in infer.MODEL_FAMILIES}) == len(infer.MODEL_FAMILIES)
    for family in infer.MODEL_FAMILIES:
        count = len(family.encoders)
        assert len(family.tokenizers) == len(family.encoder_classes) == len(family.slots) == count, family.name
        assert len(family.embedding_files([vectors(1, 4)] * count, "<x>", ".safetensors")) == count, family.name


def test_loaded_cpu_weights_sit_at_aligned_addresses_not_at_the_files_offsets(sd_pipe):
    """CPU kernels round by alignment: weights at their file's byte offsets would make a single
    file and its folder train differently in the last bit."""
    for name, part in sd_pipe.components.items():
        if isinstance(part, torch.nn.Module):
            assert all(p.data_ptr() % infer.ALIGNMENT == 0 for p in part.parameters()), name


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_written_files_get_the_mode_the_umask_of_the_moment_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = infer.write_text(tmp_path / f"{umask:o}.txt", "x")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------------------
# Errors that say what to do.


def test_width_that_does_not_fit_names_both_widths_and_the_likely_family(tmp_path, sd_pipe):
    save_file({"<sd2-thing>": vectors(1, 1024)}, tmp_path / "sd2.safetensors")
    with pytest.raises(infer.UserError) as error:
        infer.load_embedding(sd_pipe, tmp_path / "sd2.safetensors")
    assert str(error.value) == (
        f"{tmp_path / 'sd2.safetensors'}: its vectors are 1024 wide, made for SD 2.x, but the base model's text "
        "encoder takes 32; load it on an SD 2.x model, or use an embedding made for this base model"
    )


def test_sd_embedding_on_an_sdxl_base_is_refused(tmp_path, sdxl_pipe):
    save_file({"<sd1>": vectors(1, 768)}, tmp_path / "sd1.safetensors")
    with pytest.raises(infer.UserError, match=r"768 wide, made for SD 1.x, .* take 32\+64.* each of its text"):
        infer.load_embedding(sdxl_pipe, tmp_path / "sd1.safetensors")


def test_sdxl_embedding_on_a_one_encoder_base_uses_clip_l_with_a_warning(tmp_path, sd_pipe, caplog):
    save_file({"clip_l": vectors(2, 32, 1), "clip_g": vectors(2, 64, 2)}, tmp_path / "xl.safetensors")

    tokens = infer.load_embedding(sd_pipe, tmp_path / "xl.safetensors")

    assert torch.equal(rows_in(sd_pipe, tokens)["clip_l"], vectors(2, 32, 1))
    assert "is an SDXL embedding (clip_l + clip_g); loading its clip_l vectors only" in caplog.text


def test_sdxl_embedding_whose_clip_l_does_not_fit_is_refused(tmp_path, sd_pipe):
    save_file({"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)}, tmp_path / "real-xl.safetensors")
    with pytest.raises(infer.UserError, match=r"768\+1280 wide, made for SDXL, .* not even its clip_l part fits"):
        infer.load_embedding(sd_pipe, tmp_path / "real-xl.safetensors")


def test_token_that_exists_says_how_to_rename_it(trained_sd, sd_pipe):
    infer.load_embedding(sd_pipe, trained_sd)
    with pytest.raises(infer.UserError, match=r"'<concept>' already exists .* with --token"):
        infer.load_embedding(sd_pipe, trained_sd)
    assert infer.load_embedding(sd_pipe, trained_sd, token="<concept-2>") == ["<concept-2>", "<concept-2>_1"]


def test_more_token_flags_than_embeddings_is_an_error(trained_sd, tiny_sd, tmp_path, capsys):
    argv = generate_argv(tiny_sd, tmp_path, "--embedding", trained_sd, "--token", "a", "--token", "b", "--prompt", "x")
    assert cli(*argv) == 2
    assert (
        capsys.readouterr().err
        == "error: 2 --token given for 1 --embedding; each --token renames the --embedding in the same position\n"
    )


@pytest.mark.parametrize("height", [-8, 0, 4, 100])
def test_a_size_that_is_not_a_positive_multiple_of_8_is_refused_before_the_model_loads(height, tmp_path, capsys):
    argv = generate_argv(tmp_path / "no-model-here", tmp_path, "--prompt", "x")
    assert cli(*argv, "--height", height) == 2
    assert capsys.readouterr().err == f"error: --height must be a positive multiple of 8 (got {height})\n"


# ----------------------------------------------------------------------------------------
# Conversion: the layouts other tools read, round-tripping to identical tensors.


@pytest.mark.parametrize("to", infer.CONVERT_FORMATS)
@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_convert_round_trips_to_identical_tensors(model, to, trained_sd, trained_sdxl, tmp_path, capsys):
    src = trained_sd if model == "sd" else trained_sdxl
    original = infer.read_embedding(src)

    assert cli("convert", src, tmp_path / "out", "--to", to) == 0

    written = [Path(p) for p in capsys.readouterr().out.split()]
    back = infer.read_embedding(written[0])
    assert back.vectors.keys() == original.vectors.keys()
    for slot in original.vectors:
        assert torch.equal(back.vectors[slot], original.vectors[slot])
    keeps_token = to == "diffusers" or (to == "a1111" and model == "sd")
    assert back.token == (original.token if keeps_token else infer.file_name_for_token(original.token))


def test_convert_to_a1111_writes_the_a1111_pt_layout(trained_sd, tmp_path, capsys):
    assert cli("convert", trained_sd, tmp_path, "--to", "a1111") == 0
    data = torch.load(tmp_path / "concept.pt", weights_only=True)
    assert data.keys() == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["name"] == "<concept>" and data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], load_file(trained_sd / "learned_embeds.safetensors")["<concept>"])


def test_convert_to_kohya_writes_emb_params_named_after_the_token(trained_sd, tmp_path, capsys):
    assert cli("convert", trained_sd, tmp_path, "--to", "kohya") == 0
    assert list(load_file(tmp_path / "concept.safetensors")) == ["emb_params"]


def test_convert_sdxl_to_a1111_writes_one_clip_l_clip_g_file(trained_sdxl, tmp_path, capsys):
    assert cli("convert", trained_sdxl, tmp_path / "cat.safetensors", "--to", "a1111") == 0
    data = load_file(tmp_path / "cat.safetensors")
    assert {k: list(v.shape) for k, v in data.items()} == {"clip_l": [1, 32], "clip_g": [1, 64]}


def test_convert_with_the_wrong_extension_says_which_one(trained_sd, tmp_path, capsys):
    assert cli("convert", trained_sd, tmp_path / "x.safetensors", "--to", "a1111") == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'x.safetensors'}: --to a1111 writes .pt files here; name it so\n"
    )
