"""infer.py on a run of several concepts (--concepts_list): OUTPUT_DIR/concepts.json names the
concept folders, each holding what a one-concept run writes. Generating with --embedding OUTPUT_DIR
loads every concept; `eval OUTPUT_DIR` scores each against its own photos, into its own folder;
single-embedding readers (convert) name the folders to give instead.

The run is one run of the real trainer on conftest's tiny pipeline with --concepts_list: anna and
coat, on different photos.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import RESOLUTION, train_args, train_once
from PIL import Image
from safetensors.torch import load_file

import infer

STEPS = 2  # denoising steps per image
CONCEPTS = {"anna": "<anna>", "coat": "<coat>"}


def run_cli(*argv) -> SimpleNamespace:
    """`python infer.py ...` in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = infer.main([str(a) for a in argv])
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


def one_line_error(done: SimpleNamespace) -> str:
    assert done.code == 2, done.err
    (line,) = [line for line in done.err.splitlines() if line.startswith("error: ")]
    return line


@pytest.fixture(scope="module")
def concepts_run(tiny_sd, photos, other_photos, tmp_path_factory) -> Path:
    """OUTPUT_DIR of one run of two concepts (--concepts_list): anna (2 vectors, 3 photos) and
    coat (1 vector, 2 photos), each saving step 2 and its final step 4."""
    folder = tmp_path_factory.mktemp("concepts")
    listing = folder / "concepts.json"
    listing.write_text(json.dumps([
        {"name": "anna", "placeholder_token": "<anna>", "initializer_token": "person", "num_vectors": 2,
         "train_data_dir": str(photos)},
        {"name": "coat", "placeholder_token": "<coat>", "initializer_token": "backpack",
         "train_data_dir": str(other_photos)},
    ]))  # fmt: skip
    out = folder / "out"
    train_once(train_args(tiny_sd, None, out, placeholder_token=None, concepts_list=listing, max_train_steps=4,
                          save_steps=2))  # fmt: skip
    assert json.loads((out / infer.CONCEPTS_FILE).read_text())["concepts"] == list(CONCEPTS)
    return out


def generate_argv(model: Path, embedding: str | Path, out: Path) -> list:
    """One 2-step image of both concepts."""
    return ["--model", model, "--embedding", embedding, "--prompt", "a <anna> wearing a <coat>", "--seed", 1,
            "--steps", STEPS, "--height", RESOLUTION, "--width", RESOLUTION, "--out", out]  # fmt: skip


def rows(folder: Path, token: str) -> torch.Tensor:
    return load_file(folder / "learned_embeds.safetensors")[token]


def rows_in(pipe, tokens: list[str]) -> torch.Tensor:
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    return encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)].detach()


# ----------------------------------------------------------------------------------------
# Generating: every concept loads.


def test_generate_with_the_run_folder_loads_every_concept_under_its_own_token(concepts_run, tiny_sd, tmp_path):
    for name, token in CONCEPTS.items():
        assert (concepts_run / name / infer.TOKEN_FILE).read_text() == token

    done = run_cli(*generate_argv(tiny_sd, concepts_run, tmp_path))

    assert done.code == 0, done.err
    assert f"loaded <anna> (2 vectors, diffusers) from {concepts_run}/anna" in done.err
    assert f"loaded <coat> (1 vector, diffusers) from {concepts_run}/coat" in done.err
    assert "does nothing" not in done.err  # the prompt uses both
    settings = infer.read_png_settings(tmp_path / "00000-1.png")
    assert [e["token"] for e in settings["embeddings"]] == ["<anna>", "<coat>"]


def test_load_embedding_on_the_run_folder_installs_every_concept_and_returns_all_tokens(concepts_run, tiny_sd):
    pipe = infer.load_pipeline(str(tiny_sd))

    tokens = infer.load_embedding(pipe, concepts_run)

    assert tokens == ["<anna>", "<anna>_1", "<coat>"]
    assert torch.equal(rows_in(pipe, tokens[:2]), rows(concepts_run / "anna", "<anna>"))
    assert torch.equal(rows_in(pipe, tokens[2:]), rows(concepts_run / "coat", "<coat>"))


def test_a_checkpoint_of_the_run_loads_every_concept_from_its_own_folders(concepts_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "anna").mkdir(parents=True)
    (checkpoint / "coat").mkdir()
    shutil.copy(concepts_run / infer.CONCEPTS_FILE, checkpoint)
    for name, token in CONCEPTS.items():
        shutil.copy(
            concepts_run / name / "learned_embeds-steps-2.safetensors", checkpoint / name / "learned_embeds.safetensors"
        )
        (checkpoint / name / infer.TOKEN_FILE).write_text(token)

    embeddings = infer.read_embeddings(checkpoint)

    assert [(e.token, e.source) for e in embeddings] == [(t, f"{checkpoint}/{n}") for n, t in CONCEPTS.items()]
    step_2 = load_file(concepts_run / "coat" / "learned_embeds-steps-2.safetensors")["<coat>"]
    assert torch.equal(embeddings[1].vectors["clip_l"], step_2)


@pytest.mark.slow  # starts a process
def test_a_hub_repo_of_the_run_loads_every_concept_from_the_cache(concepts_run, tiny_sd, tmp_path):
    """The Hub layout (concepts.json, anna/, coat/) in a Hugging Face cache, read offline by the
    real CLI: the same huggingface_hub code path a user takes the second time."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--someone--two-concepts"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(concepts_run / infer.CONCEPTS_FILE, snapshot)
    for name in CONCEPTS:
        (snapshot / name).mkdir()
        for file in ("learned_embeds.safetensors", infer.TOKEN_FILE):
            shutil.copy(concepts_run / name / file, snapshot / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    argv = generate_argv(tiny_sd, "someone/two-concepts", tmp_path / "out")
    done = subprocess.run([sys.executable, str(Path(infer.__file__)), *map(str, argv)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "loaded <anna> (2 vectors, diffusers) from someone/two-concepts/anna" in done.stderr
    assert "loaded <coat> (1 vector, diffusers) from someone/two-concepts/coat" in done.stderr


def test_one_concept_loads_from_its_own_folder_and_the_run_again_refuses_its_tokens(concepts_run, tiny_sd):
    pipe = infer.load_pipeline(str(tiny_sd))
    assert infer.load_embedding(pipe, concepts_run / "coat") == ["<coat>"]
    with pytest.raises(infer.UserError, match="token '<coat>' already exists"):
        infer.load_embedding(pipe, concepts_run)


def test_a_token_for_the_whole_run_says_to_rename_one_concept_from_its_folder(concepts_run, tiny_sd):
    pipe = infer.load_pipeline(str(tiny_sd))
    with pytest.raises(infer.UserError, match=f"a run of 2 concepts, each with its own token.*{concepts_run}/anna"):
        infer.load_embedding(pipe, concepts_run, token="<someone>")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"names": ["anna"]}',
        '{"concepts": "anna"}',
        '{"concepts": []}',
        '{"concepts": ["../anna"]}',
        '{"concepts": [3]}',
    ],
)
def test_a_bad_concepts_file_is_a_one_line_error_naming_it(concepts_run, tmp_path, text):
    folder = Path(shutil.copytree(concepts_run, tmp_path / "out"))
    (folder / infer.CONCEPTS_FILE).write_text(text)

    error = one_line_error(run_cli("convert", folder, tmp_path / "x.pt", "--to", "a1111"))

    assert error.startswith(f"error: {folder / infer.CONCEPTS_FILE}: not a list of concepts (")
    assert error.endswith("delete it or rewrite it")


def test_a_concept_listed_but_missing_is_named_and_never_looked_up_on_the_hub(concepts_run, tmp_path):
    folder = Path(shutil.copytree(concepts_run, tmp_path / "out"))
    (folder / infer.CONCEPTS_FILE).write_text(json.dumps({"concepts": ["anna", "hat"]}))
    with pytest.raises(infer.UserError, match=f"lists 'hat', but {folder / 'hat'} is not a folder"):
        infer.read_embeddings(folder)


def test_convert_on_the_run_folder_names_the_concept_folders_to_convert_one_by_one(concepts_run, tmp_path):
    error = one_line_error(run_cli("convert", concepts_run, tmp_path / "x.pt", "--to", "a1111"))

    assert error == (
        f"error: {concepts_run}: a run of 2 concepts; give each concept's folder on its own: "
        f"{concepts_run / 'anna'}, {concepts_run / 'coat'}"
    )
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------------------
# Eval: each concept scored as its own run.


def scorer_flags(tiny_clip: Path, tiny_dino: Path, prompts: Path) -> list:
    return ["--clip_model", tiny_clip, "--dino_model", tiny_dino, "--prompts", prompts,
            "--num_images_per_prompt", 1, "--num_inference_steps", STEPS]  # fmt: skip


@pytest.fixture(scope="module")
def scoring(tiny_clip, tiny_dino, tmp_path_factory) -> list:
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("a {} on the beach\na red {}\n")
    return scorer_flags(tiny_clip, tiny_dino, prompts)


@pytest.fixture(scope="module")
def evaluated(concepts_run, scoring, tmp_path_factory) -> SimpleNamespace:
    """`infer.py eval OUTPUT_DIR` once, on a copy of the run."""
    folder = Path(shutil.copytree(concepts_run, tmp_path_factory.mktemp("evaluated") / "out"))
    done = run_cli("eval", folder, *scoring)
    assert done.code == 0, done.err
    return SimpleNamespace(folder=folder, done=done)


def test_eval_of_the_run_writes_each_concepts_eval_files_into_its_own_folder(evaluated):
    for name in CONCEPTS:
        concept = evaluated.folder / name
        labels = [line["label"] for line in infer.read_jsonl(concept / "eval.jsonl")]
        assert labels == ["real images", "step 0", "step 2", "step 4"]
        assert sorted(p.name for p in (concept / "eval").iterdir()) == ["step-0", "step-2", "step-4"]
    assert not (evaluated.folder / "eval.jsonl").exists() and not (evaluated.folder / "eval").exists()


def test_each_concept_is_scored_against_its_own_photos_and_class_word(evaluated, photos, other_photos):
    anna = infer.read_jsonl(evaluated.folder / "anna" / "eval.jsonl")
    coat = infer.read_jsonl(evaluated.folder / "coat" / "eval.jsonl")
    assert [anna[0]["images"], coat[0]["images"]] == [3, 2]  # the real-images row: each concept's photos
    assert [anna[-1]["settings"]["photos"], coat[-1]["settings"]["photos"]] == [3, 2]
    assert [anna[-1]["settings"]["class_word"], coat[-1]["settings"]["class_word"]] == ["person", "backpack"]
    records = [json.loads((evaluated.folder / n / infer.RUN_RECORD).read_text()) for n in CONCEPTS]
    assert [r["train_data_dir"] for r in records] == [str(photos), str(other_photos)]
    prompts = infer.read_png_settings(evaluated.folder / "coat" / "eval" / "step-2" / "00-00.png")["prompt"]
    assert prompts == "a <coat> on the beach"


def test_eval_of_the_run_loads_the_models_once_and_ends_with_one_pick_per_concept(evaluated):
    assert evaluated.done.err.count("loading the scorers") == 1
    assert evaluated.done.err.count("loading ") == 2  # the scorers, then the base model
    summary = evaluated.done.out.split("one per concept:\n")[1].splitlines()
    assert [line.split(":")[0] for line in summary] == list(CONCEPTS)
    for name, line in zip(CONCEPTS, summary):
        pick = next(p for p in infer.read_jsonl(evaluated.folder / name / "eval.jsonl") if p.get("pick"))
        assert line.startswith(f"{name}: {pick['label']} (CLIP-I {pick['clip_i']:.3f}")
        assert line.endswith(str(evaluated.folder / name / "eval.jsonl"))


def test_each_concept_scores_what_eval_of_its_own_folder_scores(evaluated, concepts_run, scoring, tmp_path):
    """coat, scored after anna's tokens were installed in the shared pipeline, gets the very
    images and scores an eval of its folder alone gets."""
    alone = Path(shutil.copytree(concepts_run / "coat", tmp_path / "coat"))
    done = run_cli("eval", alone, *scoring)
    assert done.code == 0, done.err

    shared = infer.read_jsonl(evaluated.folder / "coat" / "eval.jsonl")
    assert infer.read_jsonl(alone / "eval.jsonl") == shared
    pngs = sorted((alone / "eval").rglob("*.png"))
    assert len(pngs) == 6
    for png in pngs:  # the same pixels (their PNG settings name the embedding files, in other folders)
        twin = evaluated.folder / "coat" / png.relative_to(alone)
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(twin)))


def pick_step_2(lines: list[dict], rule: str) -> dict:
    return next(line for line in lines if line["label"] == "step 2")


def test_keep_best_keeps_each_concepts_own_pick(evaluated, scoring, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(evaluated.folder, tmp_path / "out"))
    monkeypatch.setattr(infer, "pick_step", pick_step_2)  # the rule is eval's; here: each concept keeps its pick

    done = run_cli("eval", folder, *scoring, "--keep_best")

    assert done.code == 0, done.err
    assert done.err.count("reusing 6 of 6 images") == 2  # per concept: steps 0, 2, 4 x 2 prompts
    for name, token in CONCEPTS.items():
        step_2 = load_file(folder / name / "learned_embeds-steps-2.safetensors")[token]
        assert torch.equal(rows(folder / name, token), step_2)
        assert (folder / name / "learned_embeds-before-eval.safetensors").is_file()


def test_keep_best_on_one_concept_respects_the_lock_of_the_run_training_into_its_parent(
    evaluated, scoring, tmp_path, monkeypatch
):
    folder = Path(shutil.copytree(evaluated.folder, tmp_path / "out"))
    monkeypatch.setattr(infer, "pick_step", pick_step_2)
    final = (folder / "anna" / "learned_embeds.safetensors").read_bytes()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as trainer:
        try:
            lock = {"pid": trainer.pid, "host": socket.gethostname(), "started": "2026-12-01T00:00:00Z"}
            (folder / infer.LOCK_FILE).write_text(json.dumps(lock))
            done = run_cli("eval", folder / "anna", *scoring, "--keep_best")
        finally:
            trainer.kill()
    assert one_line_error(done).startswith(
        f"error: OUTPUT_DIR {folder} is in use by another run: process {trainer.pid}"
    )
    assert (folder / "anna" / "learned_embeds.safetensors").read_bytes() == final


@pytest.mark.parametrize("flag", ["--train_data_dir", "--class_word", "--embeddings"])
def test_a_flag_naming_one_concepts_things_says_to_point_eval_at_its_folder(concepts_run, scoring, flag, photos):
    error = one_line_error(run_cli("eval", concepts_run, *scoring, flag, photos))
    assert error == (
        f"error: {flag} belongs to one concept, and {concepts_run} is a run of 2 concepts (anna, coat); "
        f"point eval at that concept's folder, e.g. infer.py eval {concepts_run / 'anna'} {flag} ..."
    )


def test_out_gives_each_concept_its_own_folder_under_it(concepts_run, scoring, tmp_path):
    done = run_cli("eval", concepts_run, *scoring, "--out", tmp_path / "scores")

    assert done.code == 0, done.err
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == list(CONCEPTS)
    assert [infer.read_jsonl(tmp_path / "scores" / n / "eval.jsonl")[0]["images"] for n in CONCEPTS] == [3, 2]
    assert not any((concepts_run / n / "eval.jsonl").exists() for n in CONCEPTS)


def test_a_concept_without_its_run_record_says_to_score_it_on_its_own(concepts_run, scoring, tmp_path):
    folder = Path(shutil.copytree(concepts_run, tmp_path / "out"))
    (folder / "coat" / infer.RUN_RECORD).unlink()

    error = one_line_error(run_cli("eval", folder, *scoring))

    coat = folder / "coat"
    assert error == f"error: {coat}: no run.json; score it on its own: infer.py eval {coat} --train_data_dir ..."
