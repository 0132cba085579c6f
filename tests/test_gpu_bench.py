"""bench/gpu.py, the GPU figures in one call: its CPU smoke mode runs the whole plan at the tiny
shapes, so the plan cannot rot between the days a GPU is at hand. The figures themselves are
benchmarks, not tests: here only their presence, their arithmetic and the budget are checked.

diffusers' scripts cannot be part of this repository, so the reference is a stand-in that takes
their flags and makes optimizer steps (bench/probe.py records those), and that imports torchvision's
transforms as they do, so that the PIL stand-in bench/gpu.py swaps in on a CPU runs too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from bench import gpu

pytestmark = pytest.mark.slow  # the whole GPU plan, as subprocesses

ROWS = ["sd15", "floor", "memory", "sdxl", "scoring", "compile", "concepts"]
TRAINER_KEYS = {
    "per_sample_ms",
    "samples_per_s",
    "startup_s",
    "recipe_steps",
    "recipe_wall_s",
    "recipe_wall",
    "peak_allocated_bytes",
    "peak_rss_bytes",
}


STAND_IN = """\
from torchvision import transforms
import argparse, torch
parser = argparse.ArgumentParser()
parser.add_argument("--max_train_steps", type=int, required=True)
args, _ = parser.parse_known_args()
row = torch.zeros(8, requires_grad=True)
optimizer = torch.optim.AdamW([row], lr=1e-3)
for _ in range(args.max_train_steps):
    (row - 1).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
"""


def run_gpu_bench(out: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    """One smoke run of the whole plan, with a stand-in for diffusers' SD script."""
    folder = tmp_path_factory.mktemp("gpu-smoke")
    reference = folder / "textual_inversion.py"
    reference.write_text(STAND_IN)
    # A budget that no busy machine reaches: the budget has its own test below.
    done = run_gpu_bench(folder / "out", "--budget_s", "1800", "--reference", str(reference))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((folder / "out" / "gpu.json").read_text())
    return done, report, (folder / "out" / "gpu.md").read_text()


def test_smoke_run_completes_every_row(smoke):
    _, report, _ = smoke
    assert list(report["rows"]) == ROWS
    statuses = {name: row["status"] for name, row in report["rows"].items()}
    failed = {name: report["rows"][name].get("error") for name, s in statuses.items() if s == "failed"}
    assert not failed, failed
    assert statuses == dict.fromkeys(ROWS, "done")


def test_gpu_json_names_the_machine_the_commit_and_the_command(smoke):
    _, report, _ = smoke
    assert report["smoke"] is True
    assert report["command"].startswith("python bench/gpu.py --smoke --out ")
    assert report["commit"] and report["date"]
    for key in ("summary", "gpu", "driver", "torch", "cuda", "python", "diffusers", "transformers"):
        assert key in report["machine"], key
    assert report["settings"]["budget_s"] == 1800
    assert report["settings"]["precision"] == "no"


def test_comparison_rows_give_both_trainers_per_sample_startup_recipe_and_memory(smoke):
    _, report, _ = smoke
    sd15, sdxl = report["rows"]["sd15"], report["rows"]["sdxl"]
    assert set(sd15["ours"]) >= TRAINER_KEYS and set(sd15["reference"]) >= TRAINER_KEYS
    assert set(sdxl["ours"]) >= TRAINER_KEYS and sdxl["reference"] is None  # no --reference_sdxl given
    assert sd15["shape"] == "tiny" and sdxl["shape"] == "tiny-xl"
    runs = sd15["runs"]
    assert runs["ours"]["short"]["steps"] == gpu.SMOKE.sd.ours.short
    assert runs["reference"]["short"]["steps"] == gpu.SMOKE.sd.reference.short
    assert gpu.SMOKE.sd.ours.min_long <= runs["ours"]["long"]["steps"] <= gpu.SMOKE.sd.ours.max_long
    # The recipe is measured only when the long run was the whole recipe; the reference's is projected.
    whole = runs["ours"]["long"]["steps"] == sd15["recipe_steps"]
    assert sd15["ours"]["recipe_wall"] == ("measured" if whole else "projected")
    assert sd15["reference"]["recipe_wall"] == "projected"
    assert sdxl["ours"]["recipe_wall"] == "projected"  # its long runs stop short of the recipe
    assert set(sd15["speedup"]) == {"per_sample_ms", "recipe_wall_s"}
    assert sdxl["floor"]["ms_per_sample"] > 0


def test_reference_runs_interleave_with_ours(smoke):
    _, report, _ = smoke
    compared = ["tiny-ours-short", "tiny-reference-short", "tiny-ours-long", "tiny-reference-long"]
    assert [run["label"] for run in report["runs"] if run["label"] in compared] == compared


def test_memory_row_runs_both_trainers_with_gradient_checkpointing(smoke):
    _, report, _ = smoke
    memory = report["rows"]["memory"]
    for trainer in ("ours", "reference"):
        assert {"peak_allocated_bytes", "peak_allocated_bytes_checkpointing"} <= set(memory[trainer])
    labels = {run["label"] for run in report["runs"]}
    assert {"tiny-ours-checkpointing", "tiny-reference-checkpointing"} <= labels


def assert_scoring_figures(row: dict, steps: list[int]) -> None:
    """Both evals scored every entry's images, the first making them all, the rerun none, and
    gave a positive time per scored step and images per second that agree with each other."""
    per_step = gpu.SMOKE.eval_prompts * gpu.SMOKE.eval_images
    assert row["scorers"] == "tiny" and row["images_per_step"] == per_step
    for kind in ("generate", "reuse"):
        figures = row[kind]
        assert figures["entries"] == [f"step {n}" for n in steps], kind
        assert figures["images_scored"] == per_step * len(steps), kind
        assert figures["per_step_s"] > 0 and figures["images_per_s"] > 0, kind
        assert figures["images_per_s"] * figures["per_step_s"] == pytest.approx(per_step), kind
    assert row["generate"]["generated"] == row["generate"]["images_scored"]
    assert row["reuse"]["generated"] == 0 and row["reuse"]["generating_per_step_s"] == 0


def test_scoring_row_times_infer_eval_on_the_sd15_runs_generating_then_reusing(smoke):
    _, report, text = smoke
    row = report["rows"]["scoring"]
    assert row["source"] == "sd15"
    # The long run's final rows, and the short run's as its step-N file; step 0 is the initializer.
    steps = [0, gpu.SMOKE.sd.ours.short, report["rows"]["sd15"]["runs"]["ours"]["long"]["steps"]]
    assert_scoring_figures(row, steps)
    labels = [run["label"] for run in report["runs"]]
    assert labels.index("scoring-generate") < labels.index("scoring-reuse")
    assert "#### scoring: done" in text
    assert "| first eval: generate + score |" in text and "| rerun: every image reused (score only) |" in text


def test_scoring_row_alone_scores_a_run_it_makes(tmp_path):
    done = run_gpu_bench(tmp_path / "out", "--budget_s", "1800", "--rows", "scoring")
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    row = report["rows"]["scoring"]
    assert row["status"] == "done", row
    assert row["source"].startswith("a run made here")
    steps = max(2, gpu.SMOKE.sd.ours.short)
    assert_scoring_figures(row, [0, steps // 2, steps])  # it saves every steps // 2
    assert [run["label"] for run in report["runs"]] == ["tiny-ours-scoring", "scoring-generate", "scoring-reuse"]


def test_per_scored_step_is_the_span_from_the_first_entry_to_the_last_over_the_steps_between():
    def mark(time: float, step: int, generating_s: float) -> dict:
        return {"time": time, "label": f"step {step}", "images": 4, "generated": 4, "generating_s": generating_s}

    # Start-up and the first entry take 5 s; each later entry 2 s, 1.5 s of it generating.
    record = {"marks": [mark(5.0, 0, 1.0), mark(7.0, 2, 2.5), mark(9.0, 4, 4.0)]}
    figures = gpu.eval_figures(record, wall=10.0, default_images=100)
    assert figures["entries"] == ["step 0", "step 2", "step 4"] and figures["images_scored"] == 12
    assert figures["per_step_s"] == pytest.approx(2.0)
    assert figures["images_per_s"] == pytest.approx(2.0)  # 8 images in the 4 s after the first entry
    assert figures["generating_per_step_s"] == pytest.approx(1.5)
    assert figures["default_step_s"] == pytest.approx(50.0)
    with pytest.raises(gpu.RunFailed):
        gpu.eval_figures({"marks": record["marks"][:1]}, wall=6.0, default_images=100)


def test_the_rerun_is_skipped_when_the_rows_share_cannot_hold_it():
    first = {"wall_s": 12.0, "generating_s": 8.0}  # the rerun needs about 4 s
    assert gpu.rerun_skipped(spent=20.0, allowance=25.0, first=first) is None
    reason = gpu.rerun_skipped(spent=22.0, allowance=25.0, first=first)
    assert reason.startswith("the row's share of the budget was spent") and "about 4 s" in reason


def test_compile_row_reports_the_cold_compile_time_and_both_speeds(smoke):
    _, report, _ = smoke
    row = report["rows"]["compile"]
    assert row["backend"] == "eager" and row["cold"] is True
    assert row["startup_s"] > 0 and row["compile_s"] is not None
    assert row["in_run_ms_per_sample"] > 0 and row["plain_in_run_ms_per_sample"] > 0


def test_concepts_row_runs_four_separate_runs_then_one_joint_run_of_four_concepts(smoke):
    _, report, text = smoke
    row = report["rows"]["concepts"]
    assert row["concepts"] == gpu.CONCEPTS == 4 and row["steps"] == gpu.SMOKE.concepts_steps
    labels = [run["label"] for run in report["runs"] if run["label"].startswith("concepts-")]
    assert labels == [f"concepts-separate-{k}" for k in range(4)] + ["concepts-joint"]
    steps = gpu.SMOKE.concepts_steps  # each separate run's; the joint run trains as many samples as all 4
    assert [run["steps"] for run in [*row["separate"], row["joint"]]] == [steps] * 4 + [4 * steps]
    assert row["separate_wall_s"] == pytest.approx(sum(run["wall_s"] for run in row["separate"]))
    assert row["joint_startup_s"] == row["joint"]["startup_s"] > 0
    assert row["separate_in_run_ms_per_sample"] > 0 and row["joint_in_run_ms_per_sample"] > 0
    samples = 4 * steps * gpu.SAMPLES_PER_STEP
    assert row["joint_wall_ms_per_sample"] == pytest.approx(1000 * row["joint_wall_s"] / samples)
    assert "| | 4 separate runs | joint run of 4 concepts | separate / joint |" in text


def test_markdown_section_gives_date_commit_machine_command_and_goals(smoke):
    done, report, text = smoke
    assert text.startswith("\n### CPU smoke run of bench/gpu.py")
    assert f"- date: {report['date']}; commit: {report['commit']}; machine: " in text
    assert f"- command: `{report['command']}`" in text
    assert "| goal (issue 17) | figure | |" in text
    assert "#### sd15: done" in text and "| ours vs reference (above 1: ours ahead) |" in text
    assert done.stdout.strip() == text.strip()  # printed last, for a reply that keeps only the tail


def test_a_small_budget_ends_cleanly_with_the_rows_so_far(tmp_path):
    done = run_gpu_bench(tmp_path / "out", "--budget_s", "12")
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    rows = list(report["rows"].values())
    assert all(row["status"] in ("done", "stopped", "skipped") for row in rows), rows
    # The whole plan cannot end in 12 s; from the first row the budget cut, every row says so.
    first = next(i for i, row in enumerate(rows) if row["status"] != "done")
    assert all(row["reason"].startswith("budget: ") for row in rows[first:]), rows
    assert rows[-1]["status"] == "skipped"
    assert (tmp_path / "out" / "gpu.md").read_text().startswith("\n### ")


def process_state(pid: int) -> str | None:
    """The state letter of a process in /proc (Z: exited, unreaped), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return None


def test_a_run_past_the_deadline_is_stopped_with_the_processes_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # so that the SIGKILL after the grace is needed
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    status, _, _ = gpu.run_until([sys.executable, "-c", script], dict(os.environ), time.monotonic() + 8, grace_s=1)
    assert status is None
    assert process_state(int(pid_file.read_text())) in (None, "Z")


CALIBRATION = gpu.Calibration(startup_s=10.0, per_step_s=0.02, tail_s=1.0)
BOUNDS = gpu.Steps(short=20, min_long=200, max_long=3000)


def test_the_long_run_is_the_whole_recipe_when_it_fits_its_share():
    assert gpu.long_steps(CALIBRATION, BOUNDS, 3000, allowance=30, recipe_allowance=80, limit=300) == 3000


def test_otherwise_the_long_run_fills_its_allowance():
    steps = gpu.long_steps(CALIBRATION, BOUNDS, 3000, allowance=40, recipe_allowance=50, limit=300)
    assert BOUNDS.min_long <= steps < 3000
    assert CALIBRATION.seconds(steps) <= 40 < CALIBRATION.seconds(steps + 1)


def test_no_long_run_starts_that_cannot_end_before_the_deadline():
    with pytest.raises(gpu.BudgetSpent):
        gpu.long_steps(CALIBRATION, BOUNDS, 3000, allowance=40, recipe_allowance=50, limit=CALIBRATION.seconds(199))


def test_per_sample_is_the_difference_of_the_two_runs_over_the_extra_samples():
    def run(steps: int, startup: float, end: float) -> dict:
        return {
            "steps": steps,
            "startup_s": startup,
            "synced_end_s": end,
            "wall_s": end + 0.5,
            "peak_allocated_bytes": None,
            "peak_rss_bytes": 1,
            "in_run_ms_per_sample": None,
        }

    # 200 extra steps of 4 samples cost 4 s more between the first step and the synchronized end.
    figures = gpu.trainer_figures(run(20, 10.0, 12.0), run(220, 11.0, 17.0), recipe_steps=3000, whole=False)
    assert figures["per_sample_ms"] == pytest.approx(5.0)
    assert figures["recipe_wall"] == "projected"
    assert figures["recipe_wall_s"] == pytest.approx(10.5 + 12_000 * 0.005)  # mean start-up + 12,000 samples
    measured = gpu.trainer_figures(run(20, 10.0, 12.0), run(3000, 11.0, 80.0), recipe_steps=3000, whole=True)
    assert measured["recipe_wall"] == "measured" and measured["recipe_wall_s"] == 80.5
