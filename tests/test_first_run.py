"""A newcomer's first run, offline: `infer.py tryout` (a tiny pipeline built on first use, a short
run on their photos, an image) and `bench/models.py scorers` (random-weight CLIP and DINO that
`infer.py eval` loads), all under runs/, which git ignores."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, make_photo

import infer
import textual_inversion

WHERE = "put 3-5 photos of your thing in my_photos/ or pass --photos FOLDER"


def tryout(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    """`python infer.py tryout ...` in this process: its exit code, stdout lines and error lines."""
    code = infer.main(["tryout", *argv])
    captured = capsys.readouterr()
    return code, captured.out.split(), [line for line in captured.err.splitlines() if line.startswith("error:")]


@pytest.fixture
def my_photos(tmp_path, monkeypatch):
    """A fresh folder to run in, holding my_photos/ with three photos."""
    monkeypatch.chdir(tmp_path)
    for k in range(3):
        make_photo(tmp_path / "my_photos" / f"{k}.jpg", seed=k)
    return tmp_path / "my_photos"


def test_without_photos_it_says_where_they_go_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tryout(capsys) == (2, [], [f"error: my_photos does not exist: {WHERE}"])
    (tmp_path / "my_photos").mkdir()
    (tmp_path / "my_photos" / "notes.txt").write_text("no photo")
    assert tryout(capsys) == (2, [], [f"error: my_photos holds no photos (png, jpg, webp, ...): {WHERE}"])
    elsewhere = "error: elsewhere does not exist: put 3-5 photos of your thing in elsewhere/ or pass --photos FOLDER"
    assert tryout(capsys, "--photos", "elsewhere") == (2, [], [elsewhere])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_photos"]


def test_one_command_builds_the_pipeline_trains_and_generates_under_runs(my_photos, tmp_path, capsys):
    code, printed, errors = tryout(capsys)

    assert (code, errors) == (0, [])
    assert printed == ["runs/tryout/images/00000-0.png", "runs/tryout/images/grid.png"]  # relative, as given
    run = tmp_path / "runs" / "tryout"
    assert (tmp_path / "runs" / "tiny-sd" / "model_index.json").is_file()
    assert (run / "learned_embeds.safetensors").is_file() and (run / "learned_embeds-steps-10.safetensors").is_file()
    settings = infer.read_png_settings(run / "images" / "00000-0.png")
    assert settings["prompt"] == "a photo of <my-thing>" and settings["model"] == "runs/tiny-sd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_photos", "runs"]  # nothing else lying around


def test_a_second_tryout_goes_to_a_numbered_folder_on_the_pipeline_already_built(
    my_photos, tmp_path, monkeypatch, capsys
):
    model = tmp_path / "runs" / "tiny-sd"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")  # built before: not rebuilt
    (tmp_path / "runs" / "tryout").mkdir()
    (tmp_path / "runs" / "tryout-2").mkdir()
    trained, generated = [], []
    monkeypatch.setattr(textual_inversion, "main", lambda argv: trained.append(argv) or 0)
    monkeypatch.setattr(infer, "run_generate", lambda args: generated.append(args) or [])

    assert tryout(capsys, "--photos", str(my_photos))[0] == 0
    (argv,) = trained
    assert argv[argv.index("--output_dir") + 1] == "runs/tryout-3"
    assert argv[argv.index("--pretrained_model_name_or_path") + 1] == "runs/tiny-sd"
    assert generated[0].embedding == ["runs/tryout-3"] and generated[0].out == "runs/tryout-3/images"
    assert (model / "model_index.json").read_text() == "{}"


def test_runs_and_my_photos_are_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/runs/" in ignored and "/my_photos/" in ignored


def test_the_scorers_command_builds_a_clip_and_a_dino_that_eval_loads(photos, tmp_path):
    command = [sys.executable, str(ROOT / "bench" / "models.py"), "scorers", str(tmp_path / "scorers")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / "scorers" / "clip"), str(tmp_path / "scorers" / "dino")]

    scorers = infer.Scorers(str(tmp_path / "scorers" / "clip"), str(tmp_path / "scorers" / "dino"))
    pictures = infer.read_photos(photos, "--train_data_dir")
    scores = scorers.score(pictures[:1], ["a photo of a toy"], pictures)
    assert {key: value.shape for key, value in scores.items()} == {"clip_i": (1,), "clip_t": (1,), "dino": (1,)}
