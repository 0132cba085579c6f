"""diffusers' own example tests (examples/textual_inversion/test_textual_inversion*.py), in this
project's words: the same command lines, launched the way they launch them (`accelerate launch
--config_file` with accelerate's basic config), with only the Hub model ids replaced by the tiny
local pipelines. Their folder checks are kept, except where the reference trains one step past
--max_train_steps on resume: here nothing runs past the limit."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # each test launches accelerate

SCRIPTS = {"sd": "tiny_sd", "sdxl": "tiny_sdxl"}


@pytest.fixture(scope="module")
def launch_args(tmp_path_factory) -> list[str]:
    from accelerate.utils import write_basic_config

    config = tmp_path_factory.mktemp("accelerate") / "default_config.yml"
    write_basic_config(save_location=str(config))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]


@pytest.fixture(params=list(SCRIPTS), ids=list(SCRIPTS))
def model(request):
    return request.getfixturevalue(SCRIPTS[request.param])


def example_args(model, photos, out, max_train_steps: int, *extra: str) -> list[str]:
    """The example tests' command line (their model id and image folder swapped for local ones)."""
    return [
        str(ROOT / "textual_inversion.py"),
        *f"--pretrained_model_name_or_path {model} --train_data_dir {photos} --learnable_property object".split(),
        *"--placeholder_token <cat-toy> --initializer_token a --save_steps 1 --num_vectors 2".split(),
        *"--resolution 64 --train_batch_size 1 --gradient_accumulation_steps 1".split(),
        *f"--max_train_steps {max_train_steps} --learning_rate 5.0e-04 --scale_lr".split(),
        *f"--lr_scheduler constant --lr_warmup_steps 0 --output_dir {out}".split(),
        *extra,
    ]


def run(launch_args: list[str], args: list[str]) -> str:
    """The run's output; it must succeed."""
    done = subprocess.run([*launch_args, *args], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def checkpoint_names(out) -> set[str]:
    return {p.name for p in out.iterdir() if "checkpoint" in p.name}


def test_the_example_run_writes_learned_embeds(launch_args, model, photos, tmp_path):
    run(launch_args, example_args(model, photos, tmp_path, 2))
    assert (tmp_path / "learned_embeds.safetensors").is_file()
    # --save_steps 1 saves at every step, the last one included, as the reference does.
    assert {p.name for p in tmp_path.glob("learned_embeds-steps-*.safetensors")} == {
        "learned_embeds-steps-1.safetensors",
        "learned_embeds-steps-2.safetensors",
    }


def test_checkpoints_total_limit_keeps_the_last_two_including_the_final_step(launch_args, model, photos, tmp_path):
    run(launch_args, example_args(model, photos, tmp_path, 3, "--checkpointing_steps=1", "--checkpoints_total_limit=2"))
    assert checkpoint_names(tmp_path) == {"checkpoint-2", "checkpoint-3"}


def test_resuming_a_finished_run_trains_nothing_and_keeps_the_checkpoints(launch_args, model, photos, tmp_path):
    run(launch_args, example_args(model, photos, tmp_path, 2, "--checkpointing_steps=1"))
    assert checkpoint_names(tmp_path) == {"checkpoint-1", "checkpoint-2"}
    resume = ["--checkpointing_steps=1", "--resume_from_checkpoint=checkpoint-2", "--checkpoints_total_limit=2"]
    output = run(launch_args, example_args(model, photos, tmp_path, 2, *resume))
    assert "is at step 2 and --max_train_steps is 2: nothing to train" in output
    assert "Done: no steps (the checkpoint was already at the end)" in output
    # The reference trains one step past the limit here and ends with checkpoint-2 and -3.
    assert checkpoint_names(tmp_path) == {"checkpoint-1", "checkpoint-2"}
