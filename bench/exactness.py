"""Proof that the trainer behaves bit for bit as it did at a given commit.

    python bench/exactness.py --against REV [--cases sd,sdxl,...] [--work DIR] [--keep] [--jobs N]
    python bench/exactness.py --list

REV's tree is exported with `git archive` (git's own metadata is not touched) and compared with
the working tree this script lives in, uncommitted changes included. Only the command line and
the output files are used, never an import of textual_inversion.py, so the trainer's insides
may change completely.

Once per invocation it builds tiny random-weight pipelines (bench/models.py), synthetic photos
(plus captions, masks and photos of several aspect ratios) and an embedding file to start
from, all offline. Then, for each case, it runs `python textual_inversion.py ...` of REV and of
the working tree as subprocesses with the same arguments, the same environment
(OMP_NUM_THREADS=1, PYTHONHASHSEED=0, HF_HUB_OFFLINE=1, an empty HF_HOME, no GPU unless
--cuda) and the same --seed, each into its own output folder, and compares the two folders:

  - the set of file names (the logs/ tracker folder aside);
  - the bytes of every file: learned_embeds* (.safetensors, .bin, _2, -steps-N, -last, inside
    checkpoint-N/ too), the SDXL single file, token_identifier.txt, type_of_concept.txt,
    dataset.jsonl; a difference is described down to the first tensor element that differs.
    A .bin or .pt in torch's legacy format (what A1111 accepts) names its storages by memory
    address, so two runs of one commit differ in bytes: those compare by format and content;
  - metrics.jsonl record by record, with the time- and memory-dependent keys removed
    (samples_per_second and the like; see IGNORED_METRIC_KEY): every step, loss, val_loss,
    lr and norm must be equal;
  - PNG files (loss.png, validation grids) by their decoded pixels;
  - checkpoint-N/training_state.pt is not compared byte for byte: its layout is the
    trainer's own and may be renamed, as long as old checkpoints still resume, which the
    `resume` case proves.

The `resume` case crosses the change: REV trains straight to the last step and writes
checkpoint-k on the way; a second folder gets what a REV run stopped right after step k
leaves behind (checkpoint-k, the embeddings saved up to k, metrics.jsonl up to k), and the
working tree resumes it with --resume_from_checkpoint latest. The resumed folder must equal
REV's straight run. If it does not, REV resumes its own checkpoint too, so the report says
whether REV's resume was exact to begin with.

The cases (--list): sd, sdxl, captions (with masks and aspect buckets), phrase, embedding,
clip_skip, v_prediction, validation (images and early stopping), resume and single_file; ddp
(two CPU processes through `accelerate launch`) runs only when named or with --cases all.
The default matrix takes about 4 minutes of CPU (measured: 8-9.5 minutes of wall time on a
shared 2-core machine).

It prints one row per case and exits 1 if any case differs or a run fails, 0 if all are
equal. Runs are sequential by default; --jobs 2 runs them in pairs (each process uses one
thread, which keeps CPU results deterministic). The work folder (the export, the inputs,
each run's output and log.txt) is a temporary one, removed at the end unless --keep;
--work DIR puts it in DIR (new or empty) and keeps it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRAINER = "textual_inversion.py"
PLACEHOLDER = "<concept>"

# Keys of metrics.jsonl records that depend on the clock or the machine, not on what was learned.
IGNORED_METRIC_KEY = re.compile(r"per_second|samples_s$|seconds|minutes|elapsed|duration|wall|speed|time|memory|mem_")
# Files whose bytes are the trainer's private layout (see the module docstring).
NOT_COMPARED = {"training_state.pt"}
# Files the change adds on purpose (--new_output): allowed in the working tree's folder alone.
NEW_OUTPUTS: set[str] = set()
LOGS = "logs"  # the tracker folder (--logging_dir's default), inside --output_dir

# The flags every case starts from: tiny shapes, a handful of steps, every kind of file written.
BASE_FLAGS: dict[str, str | bool | None] = {
    "placeholder_token": PLACEHOLDER,
    "initializer_token": "toy",
    "resolution": "64",
    "train_batch_size": "1",
    "gradient_accumulation_steps": "2",
    "max_train_steps": "4",
    "learning_rate": "5e-3",
    "lr_scheduler": "cosine",  # an lr that changes each step, so the schedule is checked too
    "lr_warmup_steps": "0",  # with warmup the first step's lr is 0; the resume case has some
    "repeats": "2",
    "seed": "0",
    "logging_steps": "1",
    "validation_steps": "2",
    "save_steps": "2",
    "checkpointing_steps": "2",
    "checkpointing_minutes": "0",  # checkpoints by the clock would make the file set timing-dependent
    "report_to": "none",
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    what: str
    model: str  # a key of MODELS
    data: str = "photos"  # a key of DATA
    flags: dict = dataclasses.field(default_factory=dict)  # overrides BASE_FLAGS; None removes a flag
    processes: int = 1  # more than one: `accelerate launch --multi_gpu` on CPU (gloo)
    resume_at: int | None = None  # the resume-across-the-change case: the checkpoint's step
    default: bool = True  # part of the matrix when --cases is not given


CASES = {
    c.name: c
    for c in [
        Case("sd", "SD 1.x, 2 vectors, --scale_lr", "sd", flags={"num_vectors": "2", "scale_lr": True}),
        Case("sdxl", "SDXL: both encoders, the single file", "sdxl"),
        Case(
            "captions",
            "captions + masks + aspect buckets, batch 2, micro-batches of 2",
            "sd",
            data="captioned",
            flags={
                "caption_extension": ".txt",
                "masked_loss": True,
                "aspect_buckets": True,
                "train_batch_size": "2",
                "micro_batch_size": "2",
                "bucket_step": "16",  # at 64 px, three buckets for these photos
            },
        ),
        Case(
            "phrase",
            'initializer "stuffed toy cat", 3 vectors',
            "sd",
            flags={"initializer_token": "stuffed toy cat", "num_vectors": "3"},
        ),
        Case(
            "embedding",
            "--initializer_embedding (a 2-vector file)",
            "sd",
            flags={"initializer_token": None, "initializer_embedding": "{embedding}"},
        ),
        Case("clip_skip", "--clip_skip 1", "sd", flags={"clip_skip": "1"}),
        Case("v_prediction", "a v-prediction scheduler", "sd_v"),
        Case(
            "validation",
            "validation images + early stopping (patience 2)",
            "sd",
            flags={
                "validation_prompt": f"a photo of a {PLACEHOLDER}",
                "num_validation_images": "1",
                "validation_inference_steps": "2",
                "validation_steps": "1",
                "early_stopping_patience": "2",
                "max_train_steps": "8",
                "learning_rate": "0.1",  # the best step is 1, the run stops at 3: -last differs
            },
        ),
        Case(
            "resume",
            "checkpoint-3 of REV resumed by the working tree",
            "sd",
            flags={"max_train_steps": "6", "checkpointing_steps": "3", "save_steps": "3", "lr_warmup_steps": "2"},
            resume_at=3,
        ),
        Case(
            "single_file",
            "an original-layout .safetensors with --single_file_config",
            "sd1_file",
            flags={"single_file_config": "{sd1_file_config}"},
        ),
        Case(
            "ddp",
            "two CPU processes (accelerate launch --multi_gpu, gloo)",
            "sd",
            flags={"max_train_steps": "3"},
            processes=2,
            default=False,
        ),
    ]
}


# ----------------------------------------------------------------------------------------
# Comparing two output folders.


@dataclasses.dataclass
class Comparison:
    compared: int = 0  # files whose contents were compared (the name set counts as one more check)
    differences: list[str] = dataclasses.field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.differences


def folder_files(folder: Path) -> set[str]:
    """Every file under `folder` as a relative POSIX path, the tracker folder aside."""
    if not folder.is_dir():
        return set()
    files = set()
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if relative.parts[0] == LOGS or path.is_dir():
            continue
        files.add(relative.as_posix())
    return files


def compare_folders(rev: Path, new: Path) -> Comparison:
    """REV's output folder against the working tree's: names, then each file's contents."""
    result = Comparison()
    rev_files, new_files = folder_files(rev), folder_files(new)
    only_rev = sorted(rev_files - new_files)
    only_new = sorted(n for n in new_files - rev_files if Path(n).name not in NEW_OUTPUTS)
    if only_rev or only_new:
        parts = [f"only in REV: {', '.join(only_rev)}"] if only_rev else []
        parts += [f"only in the working tree: {', '.join(only_new)}"] if only_new else []
        result.differences.append("file names differ; " + "; ".join(parts))
    # metrics.jsonl first: its first difference names the step where the runs part.
    for name in sorted(rev_files & new_files, key=lambda n: (n != "metrics.jsonl", n)):
        if Path(name).name in NOT_COMPARED:
            continue
        result.compared += 1
        difference = compare_file(rev / name, new / name)
        if difference:
            result.differences.append(f"{name}: {difference}")
    return result


def compare_file(rev: Path, new: Path) -> str | None:
    """None if the two files are equal (as their kind is compared), else the first difference."""
    if rev.name == "metrics.jsonl":
        return compare_metrics(rev, new)
    if rev.suffix.lower() == ".png":
        return compare_images(rev, new)
    return compare_bytes(rev, new)


def compare_bytes(rev: Path, new: Path) -> str | None:
    a, b = rev.read_bytes(), new.read_bytes()
    if a == b:
        return None
    suffix = rev.suffix.lower()
    described = None
    if suffix == ".safetensors":
        described = describe_tensors(_load_safetensors, rev, new)
    elif suffix in (".bin", ".pt"):
        import zipfile

        if zipfile.is_zipfile(rev) != zipfile.is_zipfile(new):
            return "one is torch's zip format, the other its legacy format"
        described = describe_tensors(_load_torch, rev, new)
        if described == TENSORS_EQUAL and not zipfile.is_zipfile(rev):
            return None  # the legacy format names storages by memory address: its bytes differ run to run
    elif suffix in (".txt", ".json", ".jsonl", ".md"):
        described = describe_text(a.decode("utf-8", "replace"), b.decode("utf-8", "replace"))
    if described:
        return described
    offset = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"bytes differ at offset {offset} ({len(a)} vs {len(b)} bytes)"


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _load_torch(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def flat_tensors(data, prefix: str = "") -> dict:
    """The tensors in nested dicts and lists, under dotted paths; other leaves as they are."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out |= flat_tensors(value, f"{prefix}{key}.")
        return out
    if isinstance(data, (list, tuple)):
        out = {}
        for i, value in enumerate(data):
            out |= flat_tensors(value, f"{prefix}{i}.")
        return out
    return {prefix.rstrip("."): data}


def describe_tensors(load, rev: Path, new: Path) -> str | None:
    """The first key, shape, dtype or element that differs between two tensor files."""
    import torch

    try:
        a, b = flat_tensors(load(rev)), flat_tensors(load(new))
    except Exception:  # not readable as tensors: the byte offset will do
        return None
    if a.keys() != b.keys():
        return f"keys {sorted(a)} vs {sorted(b)}"
    for key in a:
        x, y = a[key], b[key]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            if x != y:
                return f"{key}: {x!r} vs {y!r}"
            continue
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{key}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}"
        unequal = (x.view(-1) != y.view(-1)) & ~(x.view(-1).isnan() & y.view(-1).isnan())
        if unequal.any():
            flat = int(unequal.nonzero()[0])
            index = list(torch.unravel_index(torch.tensor(flat), x.shape)) if x.ndim else []
            where = f"[{', '.join(str(int(i)) for i in index)}]"
            values = f"{x.view(-1)[flat].item()!r} vs {y.view(-1)[flat].item()!r}"
            return f"{key}{where}: {values} ({int(unequal.sum())} element(s) differ)"
    return TENSORS_EQUAL


TENSORS_EQUAL = "the tensors are equal but the bytes differ (header or metadata)"


def describe_text(a: str, b: str) -> str:
    lines_a, lines_b = a.splitlines(), b.splitlines()
    for i, (x, y) in enumerate(zip(lines_a, lines_b)):
        if x != y:
            return f"line {i + 1}: {shorten(x)!r} vs {shorten(y)!r}"
    if len(lines_a) != len(lines_b):
        return f"{len(lines_a)} vs {len(lines_b)} lines"
    return "the lines are equal but the bytes differ (line endings or a final newline)"


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def metric_records(path: Path) -> list[dict]:
    """metrics.jsonl's records without the keys that depend on the clock or the machine."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            records.append({k: v for k, v in record.items() if not IGNORED_METRIC_KEY.search(k)})
    return records


def compare_metrics(rev: Path, new: Path) -> str | None:
    try:
        a, b = metric_records(rev), metric_records(new)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"not readable as JSON lines ({e})"
    for i, (x, y) in enumerate(zip(a, b)):
        # JSON text is the comparison: floats round-trip exactly, and NaN equals NaN.
        if json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True):
            continue
        where = f"record {i + 1} (step {x.get('step', '?')})"
        if x.keys() != y.keys():
            return f"{where}: keys {sorted(x)} vs {sorted(y)}"
        key = next(k for k in x if json.dumps(x[k]) != json.dumps(y[k]))
        return f"{where}: {key} {x[key]!r} vs {y[key]!r}"
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} records"
    return None


def compare_images(rev: Path, new: Path) -> str | None:
    from PIL import Image

    with Image.open(rev) as x, Image.open(new) as y:
        if x.size != y.size or x.mode != y.mode:
            return f"{x.mode} {x.size} vs {y.mode} {y.size}"
        a, b = x.tobytes(), y.tobytes()
        if a == b:
            return None
        first = next(i for i, (p, q) in enumerate(zip(a, b)) if p != q) // len(x.getbands())
        pixel = (first % x.size[0], first // x.size[0])
        return f"pixels differ, first at (x, y) = {pixel}: {x.getpixel(pixel)} vs {y.getpixel(pixel)}"


# ----------------------------------------------------------------------------------------
# The inputs: models, photos, an embedding to start from.

MODELS = {  # name -> (bench/models.py shape, prediction type, also write an original-layout file)
    "sd": ("tiny", "epsilon", False),
    "sd_v": ("tiny", "v_prediction", False),
    "sdxl": ("tiny-xl", "epsilon", False),
    "sd1_file": ("tiny-sd1-layout", "epsilon", True),
}


def synthetic_photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    """Smooth random colours and a dark blob: VAE latents with some structure."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [0.5 + 0.5 * np.sin(3 * (a * x + b * y) + c) for a, b, c in rng.uniform(-1, 1, (3, 3))]
    blob = np.exp(-(((x - rng.uniform(0.2, 0.8)) ** 2 + (y - rng.uniform(0.2, 0.6)) ** 2) / 0.02))
    pixels = (np.stack(channels, -1) * (1 - blob[..., None]) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def synthetic_mask(path: Path, size: tuple[int, int]) -> Path:
    """White (the subject) in an off-centre rectangle, black around it."""
    from PIL import Image, ImageDraw

    w, h = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle([w // 5, h // 4, w * 3 // 4, h * 4 // 5], fill=255)
    mask.save(path)
    return path


def make_photos(folder: Path) -> Path:
    """Three photos of different sizes and formats."""
    for name, size, seed in [("a.png", (96, 72), 1), ("b.jpg", (64, 80), 2), ("c.webp", (72, 72), 3)]:
        synthetic_photo(folder / name, size, seed)
    return folder


def make_captioned(folder: Path) -> Path:
    """Four photos of four aspect ratios (landscape, portrait, square, wide); two captions (one
    with [name], one without), one blank caption, two masks, one photo with neither."""
    photos = [("a.png", (96, 64)), ("b.png", (64, 96)), ("c.jpg", (80, 80)), ("d.png", (128, 64))]
    for i, (name, size) in enumerate(photos):
        synthetic_photo(folder / name, size, 10 + i)
    (folder / "a.txt").write_text("a [name] on the red car", encoding="utf-8")
    (folder / "b.txt").write_text("a blue toy in the house", encoding="utf-8")
    (folder / "c.txt").write_text("\n", encoding="utf-8")
    synthetic_mask(folder / "a-masklabel.png", (96, 64))
    synthetic_mask(folder / "c-masklabel.png", (80, 80))
    return folder


def make_embedding(path: Path) -> Path:
    """A two-vector diffusers embedding for the tiny text encoder (width 32), seeded."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    save_file({"<old-concept>": 0.02 * torch.randn(2, 32, generator=generator)}, str(path))
    return path


def build_inputs(cases: list[Case], folder: Path) -> dict[str, Path]:
    """The models, data and files the chosen cases need, built once; names for `{...}` in flags."""
    sys.path.insert(0, str(ROOT))
    from bench.models import build_pipeline, write_single_file

    inputs: dict[str, Path] = {}
    for name in sorted({c.model for c in cases}):
        shape, prediction, single_file = MODELS[name]
        pipe = build_pipeline(shape, folder / "models" / name, prediction_type=prediction)
        inputs[name] = pipe
        if single_file:
            inputs[name] = write_single_file(pipe, folder / "models" / f"{name}.safetensors")
            inputs[f"{name}_config"] = pipe
    makers = {"photos": make_photos, "captioned": make_captioned}
    for name in sorted({c.data for c in cases}):
        inputs[name] = makers[name](folder / "data" / name)
    if any(c.flags.get("initializer_embedding") == "{embedding}" for c in cases):
        inputs["embedding"] = make_embedding(folder / "data" / "old-concept.safetensors")
    return inputs


# ----------------------------------------------------------------------------------------
# Running the trainers.


def command_line(case: Case, inputs: dict[str, Path], output_dir: Path) -> list[str]:
    flags = {
        "pretrained_model_name_or_path": str(inputs[case.model]),
        "train_data_dir": str(inputs[case.data]),
        "output_dir": str(output_dir),
        **BASE_FLAGS,
        **case.flags,
    }
    argv = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if value is not True:
            argv.append(re.sub(r"\{(\w+)\}", lambda m: str(inputs[m.group(1)]), value))
    return argv


def run_environment(home: Path, cuda: bool) -> dict[str, str]:
    """The one environment both trees run in: fixed threads, hash seed, offline, no user config."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home),  # empty: no accelerate config or cache of the user's plays a part
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@dataclasses.dataclass
class Run:
    tree: Path
    argv: list[str]
    output_dir: Path
    processes: int = 1
    returncode: int | None = None
    seconds: float = 0.0

    @property
    def log(self) -> Path:
        return self.output_dir.parent / "log.txt"

    def last_lines(self, n: int = 3) -> str:
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(line.strip()[-160:] for line in lines[-n:])


def execute(run: Run, env: dict[str, str], cwd: Path, timeout: float) -> Run:
    command = [sys.executable]
    if run.processes > 1:  # plain --cpu --num_processes 2 runs one process; --multi_gpu with ACCELERATE_USE_CPU two
        command += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(run.processes)]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        env = {**env, "ACCELERATE_USE_CPU": "true"}
    command += [str(run.tree / TRAINER), *run.argv]
    run.output_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run.log, "w") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        try:
            run.returncode = subprocess.run(
                command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            run.returncode = -1
            log.write(f"\nexactness.py: killed after {timeout:.0f} s\n")
    run.seconds = time.perf_counter() - started
    return run


def crash_state_at(step: int, straight: Path, folder: Path) -> None:
    """What a run stopped right after `step` leaves in its output folder, taken from the
    straight run's: checkpoint-<step>, the embeddings saved up to it, the metrics up to it, and
    run.json naming those embeddings."""
    folder.mkdir(parents=True)
    shutil.copytree(straight / f"checkpoint-{step}", folder / f"checkpoint-{step}")
    for path in straight.glob("learned_embeds*-steps-*"):
        match = re.search(r"-steps-(\d+)", path.name)
        if match and int(match.group(1)) <= step:
            shutil.copy2(path, folder / path.name)
    lines = (straight / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    (folder / "metrics.jsonl").write_text("".join(kept), encoding="utf-8")
    record = straight / "run.json"  # the trainer's record of the files it saved, where it writes one
    if record.exists():
        data = json.loads(record.read_text(encoding="utf-8"))
        data["saved"] = {name: at for name, at in data.get("saved", {}).items() if (folder / name).exists()}
        (folder / "run.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


@dataclasses.dataclass
class Outcome:
    case: Case
    runs: list[Run]
    comparison: Comparison | None = None
    failure: str | None = None  # a run that did not finish
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.failure is None and self.comparison is not None and self.comparison.equal

    def verdict(self) -> str:
        if self.failure:
            return self.failure
        differences = self.comparison.differences
        if not differences:
            return "equal"
        more = f" (+{len(differences) - 1} more)" if len(differences) > 1 else ""
        return f"DIFFERENT: {differences[0]}{more}{self.note}"


def run_matrix(cases: list[Case], rev_tree: Path, work: Path, jobs: int, cuda: bool, timeout: float) -> list[Outcome]:
    inputs = build_inputs(cases, work / "inputs")
    home = work / "hf_home"
    home.mkdir(exist_ok=True)
    env = run_environment(home, cuda)
    plan: dict[str, dict[str, Run]] = {}
    for case in cases:
        base = work / "runs" / case.name
        rev_out, new_out = base / "rev" / "out", base / "new" / "out"
        argv_rev = command_line(case, inputs, rev_out)
        argv_new = command_line(case, inputs, new_out)
        if case.resume_at:
            argv_new += ["--resume_from_checkpoint", "latest"]
        plan[case.name] = {
            "rev": Run(rev_tree, argv_rev, rev_out, case.processes),
            "new": Run(ROOT, argv_new, new_out, case.processes),
        }

    def go(run: Run) -> Run:
        return execute(run, env, work, timeout)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # First every run that needs nothing else, REV's and the working tree's side by side.
        first = [r for c in cases for side, r in plan[c.name].items() if not (c.resume_at and side == "new")]
        list(pool.map(go, first))
        # Then the resumes across the change, from REV's checkpoints.
        resumes = []
        for case in cases:
            rev = plan[case.name]["rev"]
            if case.resume_at and rev.returncode == 0:
                crash_state_at(case.resume_at, rev.output_dir, plan[case.name]["new"].output_dir)
                resumes.append(plan[case.name]["new"])
        list(pool.map(go, resumes))

    outcomes = []
    for case in cases:
        rev, new = plan[case.name]["rev"], plan[case.name]["new"]
        outcome = Outcome(case, [rev, new])
        if rev.returncode != 0:
            outcome.failure = f"FAILED: REV's run exited {rev.returncode}: {rev.last_lines()}"
        elif new.returncode != 0:
            outcome.failure = f"FAILED: the working tree's run exited {new.returncode}: {new.last_lines()}"
        else:
            outcome.comparison = compare_folders(rev.output_dir, new.output_dir)
            if case.resume_at and not outcome.comparison.equal:
                outcome.note = control_resume(case, rev, work, env, timeout)
        outcomes.append(outcome)
    return outcomes


def control_resume(case: Case, rev: Run, work: Path, env: dict[str, str], timeout: float) -> str:
    """After a resume difference: does REV resume its own checkpoint exactly?"""
    out = work / "runs" / case.name / "rev-resumes" / "out"
    crash_state_at(case.resume_at, rev.output_dir, out)
    argv = [*[str(out) if a == str(rev.output_dir) else a for a in rev.argv], "--resume_from_checkpoint", "latest"]
    control = execute(Run(rev.tree, argv, out, case.processes), env, work, timeout)
    if control.returncode != 0:
        return f"; REV's own resume failed too (exit {control.returncode})"
    if compare_folders(rev.output_dir, out).equal:
        return "; REV's own resume of the same checkpoint is exact"
    return "; REV's own resume differs from its straight run too (not the change's doing)"


# ----------------------------------------------------------------------------------------
# The command.


def git(*argv: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=True).stdout.strip()


def export_tree(rev: str, folder: Path) -> str:
    """REV's files into `folder` with `git archive`; returns the commit it names."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"--against {rev}: not a commit in {ROOT}; give a branch, tag or commit") from None
    folder.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", commit], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:
            tar.extractall(folder)  # Python < 3.11.4: git's own archive of this repository
    if archive.wait() != 0 or not (folder / TRAINER).is_file():
        raise SystemExit(f"--against {rev}: its tree has no {TRAINER}")
    return commit


def working_tree_label() -> str:
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def choose_cases(spec: str | None) -> list[Case]:
    if spec is None:
        return [c for c in CASES.values() if c.default]
    if spec == "all":
        return list(CASES.values())
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise SystemExit(f"--cases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    return [CASES[n] for n in names]


def table(outcomes: list[Outcome]) -> str:
    rows = [("case", "what", "s", "files", "result")]
    for o in outcomes:
        files = str(o.comparison.compared + 1) if o.comparison else "-"  # +1: the set of names
        rows.append((o.case.name, o.case.what, f"{sum(r.seconds for r in o.runs):.0f}", files, o.verdict()))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.insert(1, "-" * min(160, len(lines[0]) + 10))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", help="The commit (branch, tag, sha) whose behaviour the working tree must keep.")
    p.add_argument(
        "--cases",
        default=None,
        help=f"Comma-separated cases, or all (default: {','.join(c.name for c in CASES.values() if c.default)}).",
    )
    p.add_argument("--work", default=None, help="Work folder (new or empty; kept). Default: a temporary one.")
    p.add_argument("--keep", action="store_true", help="Keep the temporary work folder and print its path.")
    p.add_argument("--jobs", type=int, default=1, help="Runs at a time (each uses one CPU thread).")
    p.add_argument("--cuda", action="store_true", help="Let the runs see the GPU (default: CPU only, deterministic).")
    p.add_argument("--timeout", type=float, default=600, help="Seconds one run may take before it counts as failed.")
    p.add_argument(
        "--new_output",
        action="append",
        default=[],
        metavar="NAME",
        help="A file the change adds on purpose (e.g. run.json): allowed in the working tree's outputs alone.",
    )
    p.add_argument("--list", action="store_true", help="List the cases and exit.")
    args = p.parse_args(argv)
    NEW_OUTPUTS.update(args.new_output)
    if not args.list and not args.against:
        p.error("--against REV is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for c in CASES.values():
            print(f"{c.name:13} {c.what}{'' if c.default else '  (only with --cases)'}")
        return 0
    cases = choose_cases(args.cases)
    if args.work:
        work = Path(args.work).resolve()
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--work {args.work}: not empty; give a new or empty folder")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="exactness-"))
    started = time.perf_counter()
    try:
        commit = export_tree(args.against, work / "rev")
        print(f"REV {args.against} = {commit[:12]}; working tree {ROOT} at {working_tree_label()}", flush=True)
        outcomes = run_matrix(cases, work / "rev", work, args.jobs, args.cuda, args.timeout)
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(outcomes))
    total = time.perf_counter() - started
    same = sum(o.ok for o in outcomes)
    print(f"{same}/{len(outcomes)} cases equal in {total:.0f} s (--jobs {args.jobs})")
    if args.work or args.keep:
        print(f"runs, outputs and logs: {work / 'runs'}")
    return 0 if same == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
