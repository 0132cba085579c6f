"""A mistyped path or a Hub that cannot be reached fails at once, in one line that names the fix.

A missing local model, photos folder or embedding says "no such folder/file" without asking the
Hub; a Hub id while the Hub does not answer says so in one line naming HF_HUB_OFFLINE=1, `hf
download` and a local folder, instead of the Hub libraries' retries (20 s and more per file).
The commands run as users run them, in a process of their own with HF_HUB_OFFLINE unset and
HF_ENDPOINT at a local port that refuses connections; the timeouts only catch a hang.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_photo
from safetensors.torch import save_file

import infer

TIMEOUT = 120  # a hang, not a duration: the retries this replaces took 40 s to 3 min


@pytest.fixture(scope="module")
def refused_endpoint():
    """http://127.0.0.1:PORT where a socket is bound but never listens: every connection is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def no_hub_env(refused_endpoint, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return {**env, "HF_ENDPOINT": refused_endpoint, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}


def one_error_line(script: str, argv: list, env: dict, cwd: Path) -> str:
    """Run `python script argv` to its one-line error; return that line."""
    command = [sys.executable, str(ROOT / script), *map(str, argv)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT, check=False)
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr, done.stderr[-3000:]
    return errors[0]


def trainer_argv(model, photos, out) -> list:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", photos, "--output_dir", out,
            "--placeholder_token", "<x>", "--initializer_token", "toy", "--report_to", "none"]  # fmt: skip


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A folder holding one saved embedding: enough for `infer.py eval` to get to its models."""
    folder = tmp_path_factory.mktemp("saved")
    save_file({"<x>": torch.randn(1, 32)}, folder / "learned_embeds.safetensors")
    return folder


def assert_names_the_fixes(line: str, label: str, download: str) -> None:
    assert line.startswith(f"error: {label}: the Hugging Face Hub cannot be reached (")
    assert "HF_HUB_OFFLINE=1" in line and f"`{download}`" in line and line.endswith("or give a local folder")


# ----------------------------------------------------------------------------------------
# A missing local path: "no such folder", whatever the command.


def test_the_trainer_says_a_missing_model_folder_does_not_exist(photos, no_hub_env, tmp_path):
    line = one_error_line("textual_inversion.py", trainer_argv("./no-such-model", photos, "out"), no_hub_env, tmp_path)
    assert line == "error: --pretrained_model_name_or_path ./no-such-model: no such folder"
    assert not (tmp_path / "out").exists()


def test_generating_says_a_missing_model_folder_does_not_exist(no_hub_env, tmp_path):
    line = one_error_line("infer.py", ["--model", "./no-such-model", "--prompt", "a toy"], no_hub_env, tmp_path)
    assert line == "error: --model ./no-such-model: no such folder"


def test_eval_says_a_missing_model_folder_does_not_exist(saved_run, photos, no_hub_env, tmp_path):
    argv = ["eval", saved_run, "--model", "./no-such-model", "--train_data_dir", photos, "--class_word", "toy"]
    assert one_error_line("infer.py", argv, no_hub_env, tmp_path) == "error: --model ./no-such-model: no such folder"


def test_a_missing_path_inside_an_existing_folder_is_a_typo_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert infer.hub_repo("runs/tiny-sd") is None
    with pytest.raises(infer.UserError, match=r"^--model runs/tiny-sd: no such folder$"):
        infer.check_source("runs/tiny-sd", "--model")


def test_a_missing_model_file_is_a_missing_file_and_a_bare_name_is_told_how_hub_ids_look():
    with pytest.raises(infer.UserError, match=r"^--model ./sd15.safetensors: no such file$"):
        infer.check_source("./sd15.safetensors", "--model")
    with pytest.raises(infer.UserError, match=r"^--model sd15: no such folder \(a Hub id is written org/name\)$"):
        infer.check_source("sd15", "--model")


def test_hub_ids_name_their_repo_and_local_paths_none(tmp_path):
    assert infer.hub_repo("sd-concepts-library/cat-toy") == "sd-concepts-library/cat-toy"
    assert infer.hub_repo("org/name/learned_embeds.safetensors") == "org/name"
    assert infer.hub_repo("./org/name") is None
    assert infer.hub_repo(str(tmp_path)) is None


# ----------------------------------------------------------------------------------------
# A Hub id while the Hub does not answer: one line with the fixes, for every command.


def test_the_trainer_fails_at_once_on_an_unreachable_hub(photos, no_hub_env, tmp_path):
    argv = trainer_argv("fake-org/fake-model", photos, "out")
    line = one_error_line("textual_inversion.py", argv, no_hub_env, tmp_path)
    label = "--pretrained_model_name_or_path fake-org/fake-model"
    assert_names_the_fixes(line, label, "hf download fake-org/fake-model")
    assert "Connection refused" in line


def test_generating_fails_at_once_on_an_unreachable_hub(no_hub_env, tmp_path):
    line = one_error_line("infer.py", ["--model", "fake-org/fake-model", "--prompt", "a toy"], no_hub_env, tmp_path)
    assert_names_the_fixes(line, "--model fake-org/fake-model", "hf download fake-org/fake-model")


def test_eval_fails_at_once_when_its_scorers_are_unreachable(tiny_sd, saved_run, photos, no_hub_env, tmp_path):
    argv = ["eval", saved_run, "--model", tiny_sd, "--train_data_dir", photos, "--class_word", "toy"]
    line = one_error_line("infer.py", argv, no_hub_env, tmp_path)
    clip = infer.DEFAULT_CLIP_MODEL
    assert_names_the_fixes(line, f"--clip_model {clip}", f"hf download {clip}")


def test_an_unreachable_hub_dataset_names_the_dataset_download(tiny_sd, no_hub_env, tmp_path):
    argv = trainer_argv(tiny_sd, "diffusers/cat_toy_example", "out")
    line = one_error_line("textual_inversion.py", argv, no_hub_env, tmp_path)
    download = "hf download diffusers/cat_toy_example --repo-type dataset"
    assert_names_the_fixes(line, "--train_data_dir diffusers/cat_toy_example", download)


def test_a_cached_repo_is_pointed_at_the_offline_switch(tiny_sd, no_hub_env, tmp_path):
    (Path(no_hub_env["HF_HOME"]) / "hub" / "models--fake-org--fake-model" / "snapshots").mkdir(parents=True)
    line = one_error_line("infer.py", ["--model", "fake-org/fake-model", "--prompt", "a toy"], no_hub_env, tmp_path)
    assert "it is in your Hugging Face cache, so run with HF_HUB_OFFLINE=1" in line


def test_the_probe_takes_any_answer_as_a_reachable_hub_and_a_refusal_as_none(no_hub_env):
    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answering = f"http://127.0.0.1:{server.server_address[1]}"
    probe = "import json, sys, infer; print(json.dumps([infer.hub_unreachable(url) for url in sys.argv[1:]]))"
    command = [sys.executable, "-c", probe, answering, no_hub_env["HF_ENDPOINT"]]
    try:  # in a process of its own: the Hub library's session refuses every request with HF_HUB_OFFLINE set
        done = subprocess.run(
            command, capture_output=True, text=True, env=no_hub_env, cwd=ROOT, timeout=TIMEOUT, check=False
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    answered, refused = json.loads(done.stdout)
    assert answered is None and "Connection refused" in refused


# ----------------------------------------------------------------------------------------
# A Hub dataset as --train_data_dir.


def test_a_hub_dataset_id_is_trained_on_from_the_hugging_face_cache(tiny_sd, tmp_path):
    """The cache as a download leaves it (datasets--org--name/refs/main, snapshots/<commit>/), read
    by the real CLI with HF_HUB_OFFLINE=1: the path a user takes after the first download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "datasets--someone--toy-photos"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for k in range(3):
        make_photo(repo / "snapshots" / commit / f"{k}.jpeg", seed=k)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    argv = trainer_argv(tiny_sd, "someone/toy-photos", tmp_path / "out")
    argv += ["--resolution", "64", "--max_train_steps", "1", "--train_batch_size", "1"]
    command = [sys.executable, str(ROOT / "textual_inversion.py"), *map(str, argv)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)

    assert done.returncode == 0, done.stderr[-3000:]
    assert ": 3 photos (" in done.stderr
    assert (tmp_path / "out" / "learned_embeds.safetensors").is_file()
