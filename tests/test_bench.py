"""A smoke run of bench/bench.py: the machinery works; the real figures are benchmarks, not tests.

diffusers' script cannot be part of this repository, so the "reference" here is a two-line
script that imports torchvision's transforms, as diffusers' does, and runs this trainer: the
bench's reference path (the patched temporary copy, the PIL stand-in, the probe, the ratios)
runs for real.
"""

from __future__ import annotations

import pytest
from conftest import ROOT

from bench import bench

pytestmark = pytest.mark.slow  # both trainers, in processes of their own


def test_bench_runs_both_trainers_and_appends_a_report(tiny_sd, photos, tmp_path):
    reference = tmp_path / "textual_inversion.py"
    script = ROOT / "textual_inversion.py"
    reference.write_text(
        "from torchvision import transforms\nimport runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\nrunpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    results = tmp_path / "RESULTS.md"
    argv = ["--model_dir", str(tiny_sd), "--data", str(photos), "--resolution", "64", "--steps", "1,3"]
    bench.main([*argv, "--reference", str(reference), "--results", str(results), "--label", "smoke"])
    text = results.read_text()
    assert text.startswith("\n### smoke\n")
    for line in (
        "| time to first optimizer step (s) |",
        "| per sample, differenced 1 to 3 steps (ms) |",
        "| steady samples/s (last 3/4 of the long run) |",
        "| peak RSS (GiB) |",
        "| checkpoint size (bytes) |",
        "Floor (bare text encoder + UNet forward/backward at batch 4):",
        "- ours: steps 1-1:",
        "- reference: steps 1-1:",
    ):
        assert line in text, line
    # Both trainers are this one, so the checkpoint sizes match and the ratio is 1.
    row = next(line for line in text.splitlines() if line.startswith("| checkpoint size"))
    ours, theirs, ratio = (cell.strip() for cell in row.strip("|").split("|")[1:])
    assert ours == theirs and ratio == "1.00x"
    assert "machine:" in text and "commit:" in text and "command: `python bench/bench.py" in text
