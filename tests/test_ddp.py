"""Several processes through accelerate (DDP): on CPU, two gloo processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, train_args
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # two processes under accelerate's launcher


def launch(argv: list[str], processes: int) -> subprocess.CompletedProcess:
    # Plain `--cpu --num_processes 2` silently runs one process; --multi_gpu with
    # ACCELERATE_USE_CPU really starts two.
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        command += ["--multi_gpu", "--num_processes", str(processes)]
    else:
        command += ["--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    # A rare hang at exit has been seen with two gloo processes: never wait forever.
    return subprocess.run(
        [*command, str(ROOT / "textual_inversion.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_sd, photos, tmp_path):
    flags = dict(max_train_steps=3, checkpointing_steps=2, save_steps=2, train_batch_size=1)
    two = launch(train_args(tiny_sd, photos, tmp_path / "two", gradient_accumulation_steps=2, **flags), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 processes)" in two.stderr + two.stdout
    one = launch(train_args(tiny_sd, photos, tmp_path / "one", gradient_accumulation_steps=4, **flags), 1)
    assert one.returncode == 0, one.stderr[-3000:]

    learned = [load_file(tmp_path / run / "learned_embeds.safetensors")["<concept>"] for run in ("two", "one")]
    assert not torch.equal(
        learned[0], load_file(tmp_path / "two" / "checkpoint-2" / "learned_embeds.safetensors")["<concept>"]
    )
    # Same samples, same noise; only the order of the float additions differs.
    torch.testing.assert_close(learned[0], learned[1], rtol=1e-4, atol=1e-6)
    # The main process alone wrote the files: the same set a one-process run writes.
    names = {run: sorted(p.name for p in (tmp_path / run).iterdir()) for run in ("two", "one")}
    assert names["two"] == names["one"]
