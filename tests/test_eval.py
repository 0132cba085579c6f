"""infer.py eval: every saved step scored as the papers score it (CLIP-I, CLIP-T, DINO), on
fixed seeds, against the training photos, with step 0 and the photos among themselves as
baselines; a recommended step; --keep_best; and the run.json the trainer writes for it.

Everything runs offline on conftest's tiny random-weight pipeline and scorers (64 px images,
2 denoising steps, 2 prompts x 2 images per step).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_photo, train_args, train_once
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

import infer

STEPS = 2  # denoising steps per image
PER_PROMPT = 2  # images per prompt
PROMPTS = "# two prompts, {} for the word\na {} on the beach\n\na red {}\n"


def run_eval(*argv) -> SimpleNamespace:
    """`python infer.py eval ...` in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = infer.main(["eval", *map(str, argv)])
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


@pytest.fixture(scope="module")
def eval_photos(tmp_path_factory) -> Path:
    """Photos as people have them: a rotated JPEG (EXIF orientation 6), a transparent PNG, a
    plain one; beside them a mask and a text file, which are not photos."""
    folder = tmp_path_factory.mktemp("eval_photos")
    make_photo(folder / "a.png", (72, 72), 1)
    make_photo(folder / "tmp.jpg", (96, 64), 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored pixels are on their side
    Image.open(folder / "tmp.jpg").save(folder / "b.jpg", exif=exif)
    (folder / "tmp.jpg").unlink()
    make_photo(folder / "c.png", (64, 80), 3, mode="RGBA")
    make_photo(folder / "a-masklabel.png", (72, 72), 4, mode="L")
    (folder / "notes.txt").write_text("not a photo")
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def run(tiny_sd, eval_photos, tmp_path_factory) -> Path:
    """A 4-step run saving learned_embeds-steps-2; its final files hold step 4."""
    out = tmp_path_factory.mktemp("eval_run") / "out"
    train_once(train_args(tiny_sd, eval_photos, out, max_train_steps=4, save_steps=2))
    return out


def scorer_flags(tiny_clip: Path, tiny_dino: Path, prompts: Path, per_prompt: int = PER_PROMPT) -> list:
    return ["--clip_model", tiny_clip, "--dino_model", tiny_dino, "--prompts", prompts,
            "--num_images_per_prompt", per_prompt, "--num_inference_steps", STEPS]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(run, tiny_clip, tiny_dino, prompts_file, tmp_path_factory) -> SimpleNamespace:
    """`infer.py eval RUN` once, on a copy of the run (tests that change files make their own)."""
    folder = Path(shutil.copytree(run, tmp_path_factory.mktemp("evaluated") / "out"))
    done = run_eval(folder, *scorer_flags(tiny_clip, tiny_dino, prompts_file))
    assert done.code == 0, done.err
    return SimpleNamespace(folder=folder, done=done, lines=infer.read_jsonl(folder / "eval.jsonl"))


def line_of(lines: list[dict], label: str) -> dict:
    return next(line for line in lines if line["label"] == label)


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


# ----------------------------------------------------------------------------------------
# What is scored, and how.


def test_every_saved_step_and_both_baselines_are_scored_in_step_order(evaluated):
    assert [line["label"] for line in evaluated.lines] == ["real images", "step 0", "step 2", "step 4"]
    assert [line["baseline"] for line in evaluated.lines] == ["real images", "initializer", None, None]
    assert [line["images"] for line in evaluated.lines] == [3, 4, 4, 4]  # 3 photos; 2 prompts x 2 images
    for step in (0, 2, 4):
        assert len(pngs(evaluated.folder / "eval" / f"step-{step}")) == 4


def test_files_holding_the_same_rows_are_scored_once(evaluated):
    final = line_of(evaluated.lines, "step 4")
    assert {"learned_embeds.safetensors", "learned_embeds.bin"} <= set(final["files"])
    assert sorted(p.name for p in (evaluated.folder / "eval").iterdir()) == ["step-0", "step-2", "step-4"]


def direct_features(images: list, texts: list[str], tiny_clip: Path, tiny_dino: Path) -> dict:
    """The papers' features straight from transformers: unit CLIP image and text features, and
    the unit CLS token of DINO's last hidden state."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

    clip, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    dino, dino_processor = ViTModel.from_pretrained(tiny_dino), AutoImageProcessor.from_pretrained(tiny_dino)
    with torch.no_grad():
        image = clip.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        cls = dino(**dino_processor(images=images, return_tensors="pt")).last_hidden_state[:, 0]
        text = clip.get_text_features(**processor(text=texts, padding=True, return_tensors="pt")).pooler_output
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    return {"image": unit(image), "text": unit(text), "dino": unit(cls)}


def training_photos(folder: Path) -> list:
    """The photos as the issue defines them: the image files, EXIF-transposed, in RGB."""
    files = [folder / name for name in ("a.png", "b.jpg", "c.png")]
    return [ImageOps.exif_transpose(Image.open(f)).convert("RGB") for f in files]


def test_scores_equal_a_direct_transformers_computation_on_the_saved_pngs(evaluated, eval_photos, tiny_clip, tiny_dino):
    photos = direct_features(training_photos(eval_photos), ["unused"], tiny_clip, tiny_dino)
    assert training_photos(eval_photos)[1].size == (64, 96)  # the rotated JPEG, upright
    for label in ("step 0", "step 2", "step 4"):
        files = pngs(evaluated.folder / "eval" / label.replace(" ", "-"))
        settings = [infer.read_png_settings(f) for f in files]
        texts = [s["prompt"].replace("<concept>", "toy") for s in settings]  # the class word for the learned one
        generated = direct_features([Image.open(f).convert("RGB") for f in files], texts, tiny_clip, tiny_dino)

        clip_t = (generated["image"] * generated["text"]).sum(dim=1)
        clip_i = (generated["image"] @ photos["image"].T).mean(dim=1)
        dino = (generated["dino"] @ photos["dino"].T).mean(dim=1)
        line = line_of(evaluated.lines, label)
        for key, values in (("clip_t", clip_t), ("clip_i", clip_i), ("dino", dino)):
            assert line[key] == pytest.approx(values.mean().item(), abs=1e-5), (label, key)
            standard_error = values.std().item() / np.sqrt(len(values))  # over images
            assert line[f"{key}_se"] == pytest.approx(standard_error, abs=1e-5), (label, key)
            red = [i for i, s in enumerate(settings) if s["eval"]["template"] == "a red {}"]
            by_prompt = {p["prompt"]: p[key] for p in line["per_prompt"]}
            assert by_prompt["a red {}"] == pytest.approx(values[red].mean().item(), abs=1e-5)


def test_the_real_images_row_scores_the_photos_against_each_other(evaluated, eval_photos, tiny_clip, tiny_dino):
    photos = direct_features(training_photos(eval_photos), ["unused"], tiny_clip, tiny_dino)
    real = line_of(evaluated.lines, "real images")
    for key, features in (("clip_i", photos["image"]), ("dino", photos["dino"])):
        similarity = features @ features.T
        others = (similarity.sum(dim=1) - similarity.diagonal()) / 2  # each photo against the 2 others
        assert real[key] == pytest.approx(others.mean().item(), abs=1e-5)
    assert real["clip_t"] is None


def test_seeds_are_fixed_per_prompt_and_image_and_the_same_at_every_step(evaluated):
    seeds = {}
    for step in (0, 2, 4):
        found = {}
        for path in pngs(evaluated.folder / "eval" / f"step-{step}"):
            settings = infer.read_png_settings(path)
            found[(settings["eval"]["template"], settings["eval"]["image"])] = settings["seed"]
            assert f"Seed: {settings['seed']}," in Image.open(path).text["parameters"]
            assert settings["prompt"] == settings["eval"]["template"].replace("{}", "<concept>")
        seeds[step] = found
    assert seeds[0] == seeds[2] == seeds[4]
    assert len(set(seeds[0].values())) == 4


def test_the_default_seeds_are_the_ones_every_eval_has_used():
    assert [infer.eval_seed("a {} on the beach", 0), infer.eval_seed("a red {}", 1)] == [1191092453, 76676481]


def test_seed_draws_another_set_the_same_at_every_step(evaluated, run, tiny_clip, tiny_dino, prompts_file, tmp_path):
    done = run_eval(run, *scorer_flags(tiny_clip, tiny_dino, prompts_file), "--seed", 7, "--out", tmp_path)
    assert done.code == 0, done.err

    default_seeds = {infer.read_png_settings(p)["seed"] for p in pngs(evaluated.folder / "eval" / "step-2")}
    for step in (0, 2, 4):
        found = {}
        for path in pngs(tmp_path / "eval" / f"step-{step}"):
            settings = infer.read_png_settings(path)
            template, k = settings["eval"]["template"], settings["eval"]["image"]
            assert settings["seed"] == infer.eval_seed(template, k, 7)
            found[path.name] = settings["seed"]
        assert len(set(found.values())) == 4 and not set(found.values()) & default_seeds
    assert {line["settings"]["seed"] for line in infer.read_jsonl(tmp_path / "eval.jsonl")} == {7}
    assert all("seed" not in line["settings"] for line in evaluated.lines)  # the default lines are as before


def test_the_scheduler_and_settings_are_named_in_the_output_and_eval_jsonl(evaluated):
    assert "dpm++ (DPM++ 2M), 2 steps, guidance 7.5, 64x64 px" in evaluated.done.err
    settings = line_of(evaluated.lines, "step 2")["settings"]
    assert settings["scheduler"] == "dpm++" and settings["num_inference_steps"] == STEPS
    assert settings["num_images_per_prompt"] == PER_PROMPT and settings["class_word"] == "toy"


def test_step_0_is_the_initializer_rows_and_each_step_reports_its_norm_and_drift(evaluated, run, tiny_sd):
    pipe = infer.load_pipeline(str(tiny_sd))
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    initial = infer.phrase_rows(weight, pipe.tokenizer.encode("toy", add_special_tokens=False), 1)
    step_2 = load_file(run / "learned_embeds-steps-2.safetensors")["<concept>"]

    zero, two = line_of(evaluated.lines, "step 0"), line_of(evaluated.lines, "step 2")
    assert zero["norm"]["clip_l"] == pytest.approx(initial.norm(dim=1).mean().item(), abs=1e-6)
    assert zero["cos_to_initializer"]["clip_l"] == pytest.approx(1.0, abs=1e-6)
    assert two["norm"]["clip_l"] == pytest.approx(step_2.norm(dim=1).mean().item(), abs=1e-6)
    expected = torch.nn.functional.cosine_similarity(step_2, initial, dim=1).mean().item()
    assert two["cos_to_initializer"]["clip_l"] == pytest.approx(expected, abs=1e-6)


def test_the_table_plot_and_pick_are_shown(evaluated):
    table = evaluated.done.out.splitlines()
    assert table[0].split() == ["CLIP-I", "CLIP-T", "DINO", "norm", "cos", "to", "init"]
    assert [row.split("  ")[0] for row in table[1:5]] == ["real images", "step 0", "step 2", "step 4"]
    picked = [line for line in evaluated.lines if line.get("pick")]
    assert len(picked) == 1 and picked[0]["pick_rule"] == "balanced"
    assert sum("<- pick (balanced)" in row for row in table) == 1
    assert f"pick (balanced): {picked[0]['label']}" in evaluated.done.out
    with Image.open(evaluated.folder / "eval.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > plot.size[1]  # two panels side by side


def test_a_rerun_reuses_every_image_and_generates_nothing(evaluated, tiny_clip, tiny_dino, prompts_file, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in (evaluated.folder / "eval").rglob("*.png")}

    def no_generation(*args, **kwargs):
        raise AssertionError("a rerun generated an image")

    monkeypatch.setattr(infer, "generate", no_generation)
    done = run_eval(evaluated.folder, *scorer_flags(tiny_clip, tiny_dino, prompts_file))

    assert done.code == 0, done.err
    assert "reusing 12 of 12 images already made" in done.err
    assert {p: p.stat().st_mtime_ns for p in (evaluated.folder / "eval").rglob("*.png")} == before
    again = infer.read_jsonl(evaluated.folder / "eval.jsonl")
    assert [line["clip_i"] for line in again] == [line["clip_i"] for line in evaluated.lines]


def test_an_interrupted_eval_resumes_from_the_images_it_made(run, evaluated, tiny_clip, tiny_dino, prompts_file,
                                                              tmp_path, monkeypatch):  # fmt: skip
    folder = Path(shutil.copytree(run, tmp_path / "out"))
    generate, calls = infer.generate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(infer, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_eval(folder, *scorer_flags(tiny_clip, tiny_dino, prompts_file))
    assert len(list((folder / "eval").rglob("*.png"))) == 5
    assert not list(folder.rglob("*.tmp"))

    monkeypatch.setattr(infer, "generate", generate)
    done = run_eval(folder, *scorer_flags(tiny_clip, tiny_dino, prompts_file))

    assert done.code == 0, done.err
    assert "reusing 5 of 12 images already made" in done.err
    lines = infer.read_jsonl(folder / "eval.jsonl")
    for line, reference in zip(lines, evaluated.lines):
        assert line["clip_i"] == pytest.approx(reference["clip_i"], abs=1e-6)


# ----------------------------------------------------------------------------------------
# The recommended step, on a hand-made eval.jsonl.

HAND_MADE = [
    {"label": "real images", "step": None, "baseline": "real images", "clip_i": 0.95, "clip_t": None},
    {"label": "step 0", "step": 0, "baseline": "initializer", "clip_i": 0.99, "clip_t": 0.99},
    {"label": "step 100", "step": 100, "baseline": None, "clip_i": 0.60, "clip_t": 0.30},
    {"label": "step 200", "step": 200, "baseline": None, "clip_i": 0.70, "clip_t": 0.28},
    {"label": "step 300", "step": 300, "baseline": None, "clip_i": 0.75, "clip_t": 0.25},
    {"label": "step 400", "step": 400, "baseline": None, "clip_i": 0.72, "clip_t": 0.24},  # step 300 beats it
    {"label": "step 500", "step": 500, "baseline": None, "clip_i": 0.76, "clip_t": 0.20},
]


@pytest.fixture
def hand_made_log(tmp_path) -> list[dict]:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in HAND_MADE) + '{"label": "torn')
    return infer.read_jsonl(path)


def test_the_pareto_front_leaves_out_the_steps_another_beats_on_both_scores(hand_made_log):
    steps = [line for line in hand_made_log if not line["baseline"]]
    assert [line["label"] for line in infer.pareto_front(steps)] == ["step 100", "step 200", "step 300", "step 500"]


def test_balanced_picks_the_highest_sum_of_the_scaled_scores_on_the_front(hand_made_log):
    # Scaled over steps 100-500: CLIP-I (0.60..0.76), CLIP-T (0.20..0.30). Sums: step 100: 0 + 1,
    # 200: 0.625 + 0.8, 300: 0.9375 + 0.5, 400 (off the front): 0.75 + 0.4, 500: 1 + 0.
    assert infer.pick_step(hand_made_log, "balanced")["label"] == "step 300"


def test_fidelity_and_editability_pick_the_highest_clip_i_and_clip_t(hand_made_log):
    assert infer.pick_step(hand_made_log, "fidelity")["label"] == "step 500"
    assert infer.pick_step(hand_made_log, "editability")["label"] == "step 100"


def test_baselines_are_never_picked_and_ties_go_to_the_earlier_step():
    tied = [dict(line) for line in HAND_MADE[:2]] + [
        {"label": "step 100", "step": 100, "clip_i": 0.7, "clip_t": 0.3},
        {"label": "step 200", "step": 200, "clip_i": 0.7, "clip_t": 0.3},
    ]
    for rule in infer.PICK_RULES:
        assert infer.pick_step(tied, rule)["label"] == "step 100"


def two_steps(first: tuple, second: tuple) -> list[dict]:
    """Lines of steps 300 and 400, each (CLIP-I, its standard error)."""
    return [
        {"label": f"step {step}", "step": step, "clip_i": score, "clip_i_se": error, "clip_t": 0.25, "clip_t_se": 0.01}
        for step, (score, error) in ((300, first), (400, second))
    ]


def test_a_pick_within_noise_of_the_next_best_step_says_so():
    lines = two_steps((0.70, 0.02), (0.71, 0.02))  # 0.01 apart, errors of 0.02: indistinguishable
    pick = infer.pick_step(lines, "fidelity")
    runner_up = infer.within_noise_of(lines, pick, "fidelity")
    assert infer.pick_text(pick, runner_up, "fidelity") == (
        "pick (fidelity): step 400, within noise of step 300 (CLIP-I 0.710 ± 0.020 vs 0.700 ± 0.020); "
        "more images per prompt (--num_images_per_prompt) narrow the errors"
    )


def test_a_pick_clear_of_the_next_best_or_without_errors_makes_no_noise_claim():
    for lines in (two_steps((0.70, 0.01), (0.80, 0.01)), two_steps((0.70, None), (0.71, None))):
        pick = infer.pick_step(lines, "fidelity")
        assert infer.within_noise_of(lines, pick, "fidelity") is None


def test_the_eval_plot_legend_sits_outside_the_data(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from test_watch import drawn_figure, legends_over_axes

    lines = [dict(line, dino=0.5) for line in HAND_MADE if line["clip_t"] is not None]
    figure = drawn_figure(monkeypatch, lambda: infer.plot_eval(lines, tmp_path / "eval.png", lines[-1]))
    assert legends_over_axes(figure) == (1, 0)


# ----------------------------------------------------------------------------------------
# --keep_best.


def pick_step_2(lines, rule):
    return line_of(lines, "step 2")


def test_keep_best_rewrites_the_final_files_from_the_pick_and_keeps_the_previous_ones(
    evaluated, tiny_clip, tiny_dino, prompts_file, tmp_path, monkeypatch
):
    folder = Path(shutil.copytree(evaluated.folder, tmp_path / "out"))
    originals = {name: (folder / name).read_bytes() for name in ("learned_embeds.safetensors", "learned_embeds.bin")}
    monkeypatch.setattr(infer, "pick_step", pick_step_2)  # the rule is tested above; here: what keeping does

    done = run_eval(folder, *scorer_flags(tiny_clip, tiny_dino, prompts_file), "--keep_best")

    assert done.code == 0, done.err
    step_2 = load_file(folder / "learned_embeds-steps-2.safetensors")["<concept>"]
    assert torch.equal(load_file(folder / "learned_embeds.safetensors")["<concept>"], step_2)
    assert torch.equal(torch.load(folder / "learned_embeds.bin", weights_only=True)["<concept>"], step_2)
    for name, data in originals.items():
        assert (folder / name.replace("learned_embeds", "learned_embeds-before-eval")).read_bytes() == data
    saved = json.loads((folder / "run.json").read_text())["saved"]
    assert saved["learned_embeds.safetensors"] == 2 and saved["learned_embeds-before-eval.safetensors"] == 4
    assert not list(folder.rglob("*.tmp"))
    # The replaced final step is still scored, from its -before-eval copy, with the images it had.
    again = run_eval(folder, *scorer_flags(tiny_clip, tiny_dino, prompts_file))
    assert "reusing 12 of 12 images" in again.err, again.err
    assert [line["label"] for line in infer.read_jsonl(folder / "eval.jsonl")][-1] == "step 4"


def test_keep_best_leaves_a_folder_alone_while_a_run_trains_into_it(
    evaluated, tiny_clip, tiny_dino, prompts_file, tmp_path, monkeypatch
):
    folder = Path(shutil.copytree(evaluated.folder, tmp_path / "out"))
    monkeypatch.setattr(infer, "pick_step", pick_step_2)
    final = (folder / "learned_embeds.safetensors").read_bytes()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as trainer:
        try:
            lock = {"pid": trainer.pid, "host": socket.gethostname(), "started": "2026-12-01T00:00:00Z"}
            (folder / infer.LOCK_FILE).write_text(json.dumps(lock))
            done = run_eval(folder, *scorer_flags(tiny_clip, tiny_dino, prompts_file), "--keep_best")
        finally:
            trainer.kill()
    assert done.code == 2 and f"error: OUTPUT_DIR {folder} is in use by another run: process {trainer.pid}" in done.err
    assert (folder / "learned_embeds.safetensors").read_bytes() == final
    assert not (folder / "learned_embeds-before-eval.safetensors").exists()


def test_the_class_word_a_run_trained_with_is_the_one_eval_reads(tiny_sd, eval_photos, tiny_clip, tiny_dino, tmp_path):
    out = tmp_path / "out"
    train_once(train_args(tiny_sd, eval_photos, out, max_train_steps=1, class_word="plush toy"))
    (tmp_path / "one.txt").write_text("a {} on the beach\n")
    done = run_eval(out, *scorer_flags(tiny_clip, tiny_dino, tmp_path / "one.txt", per_prompt=1))
    assert done.code == 0, done.err
    assert {line["settings"]["class_word"] for line in infer.read_jsonl(out / "eval.jsonl")} == {"plush toy"}


def test_keep_best_cut_short_leaves_every_file_whole_and_running_it_again_finishes(run, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(run, tmp_path / "out"))
    record = infer.read_run_record(folder)
    entry = next(e for e in infer.run_entries(folder, record) if e.step == 2)
    originals = {p.name: p.read_bytes() for p in infer.final_files(folder, "<concept>")}
    write, calls = infer.write_diffusers_embedding, []

    def disk_full_on_the_second(path, token, vectors):
        calls.append(path)
        if len(calls) == 2:
            raise infer.UserError(f"cannot write {path}: no space left on device")
        return write(path, token, vectors)

    monkeypatch.setattr(infer, "write_diffusers_embedding", disk_full_on_the_second)
    with pytest.raises(infer.UserError, match="no space left on device"):
        infer.keep_best(folder, entry, "<concept>", record)

    assert not list(folder.rglob("*.tmp"))
    for name, data in originals.items():  # the copies are complete before any final file changes
        assert (folder / name.replace("learned_embeds", "learned_embeds-before-eval")).read_bytes() == data
    rows = [infer.read_embedding(folder / name).vectors["clip_l"] for name in originals]
    assert sum(torch.equal(r, entry.embedding.vectors["clip_l"]) for r in rows) == 1  # one new, one old, both whole

    monkeypatch.setattr(infer, "write_diffusers_embedding", write)
    infer.keep_best(folder, entry, "<concept>", infer.read_run_record(folder))

    for name, data in originals.items():
        assert torch.equal(infer.read_embedding(folder / name).vectors["clip_l"], entry.embedding.vectors["clip_l"])
        assert (folder / name.replace("learned_embeds", "learned_embeds-before-eval")).read_bytes() == data


# ----------------------------------------------------------------------------------------
# Files from elsewhere, prompt sets, runs started from an embedding.


def a1111_file(path: Path, name: str, count: int, seed: int) -> Path:
    rows = torch.randn(count, 32, generator=torch.Generator().manual_seed(seed))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": name}, path)
    return path


def test_embedding_files_are_scored_against_a_model_each_under_its_own_word(
    tiny_sd, eval_photos, tiny_clip, tiny_dino, tmp_path
):
    one = a1111_file(tmp_path / "charturner.pt", "charturner", 4, 1)
    two = a1111_file(tmp_path / "charturnerv2.pt", "charturner", 2, 2)  # the same name, fewer vectors
    (tmp_path / "one.txt").write_text("a {} on the beach\n")

    done = run_eval("--embeddings", one, two, "--model", tiny_sd, "--train_data_dir", eval_photos,
                    "--class_word", "toy", "--out", tmp_path / "scores", "--resolution", 64,
                    *scorer_flags(tiny_clip, tiny_dino, tmp_path / "one.txt", per_prompt=1))  # fmt: skip

    assert done.code == 0, done.err
    lines = infer.read_jsonl(tmp_path / "scores" / "eval.jsonl")
    assert [line["label"] for line in lines] == ["real images", "charturner.pt", "charturnerv2.pt"]
    first_images = [pngs(tmp_path / "scores" / "eval" / name)[0] for name in ("charturner.pt", "charturnerv2.pt")]
    prompts = [infer.read_png_settings(path)["prompt"] for path in first_images]
    assert prompts == ["a charturner on the beach", "a charturner-2v on the beach"]
    assert all(line.get("cos_to_initializer") is None for line in lines[1:])  # no initializer to compare with


def test_the_shipped_prompt_sets_are_dreambenchs_and_name_their_source():
    objects, live = infer.read_eval_prompts("object"), infer.read_eval_prompts("live")
    assert len(objects) == len(live) == 25
    assert objects[0] == live[0] == "a {} in the jungle" and objects[-1] == live[-1] == "a cube shaped {}"
    assert "a {} with the Eiffel Tower in the background" in objects and "a {} wearing a santa hat" in live
    for name in ("dreambench_object.txt", "dreambench_live.txt"):
        assert "https://github.com/google/dreambooth" in (infer.TEMPLATES / name).read_text()
    style = infer.read_eval_prompts("style")
    assert len(style) >= 10 and all("{}" in p for p in style)


@pytest.fixture(scope="module")
def run_from_embedding(tiny_sd, eval_photos, tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("from_embedding")
    start = a1111_file(folder / "old-concept.pt", "old-concept", 2, 3)
    out = folder / "out"
    train_once(
        train_args(tiny_sd, eval_photos, out, initializer_token=None, initializer_embedding=start, max_train_steps=2)
    )
    return SimpleNamespace(out=out, start=start)


def test_a_run_from_an_embedding_needs_a_class_word_and_starts_from_that_embedding(
    run_from_embedding, tiny_clip, tiny_dino, tmp_path
):
    (tmp_path / "one.txt").write_text("a {} on the beach\n")
    flags = [*scorer_flags(tiny_clip, tiny_dino, tmp_path / "one.txt", per_prompt=1), "--out", tmp_path / "scores"]

    refused = run_eval(run_from_embedding.out, *flags)
    assert refused.code == 2 and refused.err.startswith("error: --class_word is needed: the run started from --init")

    done = run_eval(run_from_embedding.out, *flags, "--class_word", "toy")
    assert done.code == 0, done.err
    zero = line_of(infer.read_jsonl(tmp_path / "scores" / "eval.jsonl"), "step 0")
    start = infer.read_embedding(run_from_embedding.start).vectors["clip_l"]
    assert zero["norm"]["clip_l"] == pytest.approx(start.norm(dim=1).mean().item(), abs=1e-6)


def test_an_sdxl_run_is_scored_on_both_encoders_and_keep_best_rewrites_all_its_files(
    tiny_sdxl, eval_photos, tiny_clip, tiny_dino, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    train_once(train_args(tiny_sdxl, eval_photos, out, placeholder_token="<cat-toy>", max_train_steps=3, save_steps=1))
    (tmp_path / "one.txt").write_text("a {} on the beach\n")
    monkeypatch.setattr(infer, "pick_step", lambda lines, rule: line_of(lines, "step 1"))

    done = run_eval(out, *scorer_flags(tiny_clip, tiny_dino, tmp_path / "one.txt", per_prompt=1), "--keep_best")

    assert done.code == 0, done.err
    lines = infer.read_jsonl(out / "eval.jsonl")
    assert [line["label"] for line in lines] == ["real images", "step 0", "step 1", "step 2", "step 3"]
    assert set(line_of(lines, "step 2")["norm"]) == {"clip_l", "clip_g"}
    first = load_file(out / "learned_embeds-steps-1.safetensors")["<cat-toy>"]
    second = load_file(out / "learned_embeds_2-steps-1.safetensors")["<cat-toy>"]
    assert torch.equal(load_file(out / "learned_embeds.safetensors")["<cat-toy>"], first)
    assert torch.equal(load_file(out / "learned_embeds_2.safetensors")["<cat-toy>"], second)
    single = load_file(out / "cat-toy.safetensors")
    assert torch.equal(single["clip_l"], first) and torch.equal(single["clip_g"], second)
    assert (out / "cat-toy-before-eval.safetensors").is_file()
    before = infer.read_embedding(out / "learned_embeds-before-eval.safetensors")  # a pair, as every SDXL file set
    assert torch.equal(
        before.vectors["clip_g"], load_file(out / "learned_embeds_2-before-eval.safetensors")["<cat-toy>"]
    )
    again = run_eval(out, *scorer_flags(tiny_clip, tiny_dino, tmp_path / "one.txt", per_prompt=1))
    assert again.code == 0 and "reusing 4 of 4 images" in again.err, again.err  # step 3 from its -before-eval pair
    assert [line["label"] for line in infer.read_jsonl(out / "eval.jsonl")][-1] == "step 3"


# ----------------------------------------------------------------------------------------
# Errors: one line each, naming the flag or file.


def one_line_error(done: SimpleNamespace) -> str:
    """The one error line (after any "loading ..." lines), exit status 2, no traceback."""
    assert done.code == 2, done.err
    errors = [line for line in done.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and done.err.endswith(errors[0] + "\n") and "Traceback" not in done.err, done.err
    return errors[0] + "\n"


def test_a_folder_without_saved_steps_says_how_to_get_some(tmp_path):
    err = one_line_error(run_eval(tmp_path))
    assert err == (
        f"error: {tmp_path}: no saved embeddings to score (learned_embeds-steps-N.* or learned_embeds.*); save them "
        "while training with --save_steps N, or give files with --embeddings\n"
    )


def test_an_embedding_of_another_width_is_refused_before_any_image(
    tiny_sd, eval_photos, tiny_clip, tiny_dino, tmp_path
):
    save_file({"<wide>": torch.zeros(1, 1024)}, tmp_path / "wide.safetensors")
    done = run_eval("--embeddings", tmp_path / "wide.safetensors", "--model", tiny_sd, "--train_data_dir", eval_photos,
                    "--class_word", "toy", "--clip_model", tiny_clip, "--dino_model", tiny_dino,
                    "--out", tmp_path / "scores")  # fmt: skip
    assert "its vectors are 1024 wide, made for SD 2.x, but the base model's text encoder takes 32" in one_line_error(
        done
    )
    assert not (tmp_path / "scores" / "eval").exists()


def test_a_scorer_that_is_not_available_offline_says_how_to_download_it(run, tiny_dino):
    err = one_line_error(run_eval(run, "--clip_model", "nobody/no-such-clip", "--dino_model", tiny_dino))
    assert err.startswith("error: --clip_model nobody/no-such-clip: cannot load it (")
    assert err.endswith("download it once with `hf download nobody/no-such-clip` (it then loads offline), or give a "
                        "local folder\n")  # fmt: skip


def test_missing_photos_name_the_flag_or_the_run_record(run, tmp_path):
    err = one_line_error(run_eval(run, "--train_data_dir", tmp_path / "gone"))
    assert (
        err == f"error: --train_data_dir {tmp_path / 'gone'}: no such folder; give the folder of the training photos\n"
    )

    folder = Path(shutil.copytree(run, tmp_path / "moved"))
    record = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**record, "train_data_dir": str(tmp_path / "photos-moved")}))
    err = one_line_error(run_eval(folder))
    assert err.startswith(f"error: {folder / 'run.json'}: train_data_dir {tmp_path / 'photos-moved'}: no such folder")


def test_files_without_a_model_or_a_class_word_say_which_flag_is_needed(run, eval_photos, tmp_path):
    folder = Path(shutil.copytree(run, tmp_path / "no-record"))
    (folder / "run.json").unlink()
    assert "error: --model is needed: " in one_line_error(run_eval(folder))
    err = one_line_error(run_eval("--embeddings", run / "learned_embeds.safetensors", "--model", "m",
                                  "--train_data_dir", eval_photos))  # fmt: skip
    assert err.startswith("error: --class_word is needed: ")


# ----------------------------------------------------------------------------------------
# run.json: what the trainer records for eval.


def test_run_json_records_the_pipeline_the_photos_and_the_step_of_each_saved_file(run, tiny_sd, eval_photos):
    record = json.loads((run / "run.json").read_text())
    assert record["format"] == "textual-inversion-run/1"
    assert record["model"] == str(tiny_sd.resolve()) and record["train_data_dir"] == str(eval_photos.resolve())
    assert {k: record[k] for k in ("placeholder_token", "initializer_token", "num_vectors", "resolution")} == {
        "placeholder_token": "<concept>",
        "initializer_token": "toy",
        "num_vectors": 1,
        "resolution": 64,
    }
    assert record["clip_skip"] == 0 and record["vae"] is None and record["learnable_property"] == "object"
    assert {k: v for k, v in record["saved"].items() if "steps" in k} == {
        "learned_embeds-steps-2.safetensors": 2,
        "learned_embeds-steps-4.safetensors": 4,
    }
    assert record["saved"]["learned_embeds.safetensors"] == record["saved"]["learned_embeds.bin"] == 4


def test_run_json_gives_the_best_step_to_learned_embeds_under_early_stopping(tiny_sd, eval_photos, tmp_path):
    out = tmp_path / "out"
    train_once(train_args(tiny_sd, eval_photos, out, max_train_steps=4, save_steps=1, validation_steps=1,
                          early_stopping_patience=10))  # fmt: skip

    saved = json.loads((out / "run.json").read_text())["saved"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = min((m for m in metrics if "val_loss" in m), key=lambda m: m["val_loss"])["step"]
    assert saved["learned_embeds-last.safetensors"] == 4 and saved["learned_embeds.safetensors"] == best
    if best == 0:
        pipe = infer.load_pipeline(str(tiny_sd))
        ids = pipe.tokenizer.encode("toy", add_special_tokens=False)
        expected = infer.phrase_rows(pipe.text_encoder.get_input_embeddings().weight.detach(), ids, 1)
    else:
        expected = load_file(
            out / (f"learned_embeds-steps-{best}.safetensors" if best < 4 else "learned_embeds-last.safetensors")
        )["<concept>"]
    assert torch.equal(load_file(out / "learned_embeds.safetensors")["<concept>"], expected)


def test_a_resumed_run_keeps_the_record_of_its_earlier_saves(tiny_sd, eval_photos, tmp_path):
    out = tmp_path / "out"
    train_once(train_args(tiny_sd, eval_photos, out, max_train_steps=3, save_steps=1, checkpointing_steps=2))
    resumed = train_args(tiny_sd, eval_photos, out, "--resume_from_checkpoint", "latest", max_train_steps=5,
                         save_steps=1, checkpointing_steps=2)  # fmt: skip
    train_once(resumed)

    saved = json.loads((out / "run.json").read_text())["saved"]
    assert saved["learned_embeds-steps-1.safetensors"] == 1  # saved before the resume
    assert saved["learned_embeds-steps-3.safetensors"] == 3 and saved["learned_embeds.safetensors"] == 5
