"""Shared fixtures: tiny random-weight pipelines (built once per session, offline) and photos.

Nothing here downloads: the pipelines come from configs in bench/models.py with a tokenizer
whose vocab.json/merges.txt are written on the spot.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One thread, in this process and in the processes tests start (set before numpy and torch
# load): the tiny models gain nothing from a second one, and on a busy machine two threads
# spin-wait against other processes (a 4-step tiny run: 19 s of CPU with two, 0.7 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import build_clip_scorer, build_dino_scorer, build_pipeline, write_single_file  # noqa: E402

RESOLUTION = 64  # 8x8 latents with the tiny 8x VAE


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD 1.x-shaped pipeline folder (epsilon prediction)."""
    return build_pipeline("tiny", tmp_path_factory.mktemp("tiny_sd") / "pipe")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """The same shapes with a v-prediction scheduler, as SD 2.x uses."""
    return build_pipeline("tiny", tmp_path_factory.mktemp("tiny_sd_v") / "pipe", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random-weight CLIPModel folder with its CLIPProcessor, for `infer.py eval --clip_model`."""
    return build_clip_scorer("tiny", tmp_path_factory.mktemp("tiny_clip") / "clip")


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> Path:
    """A tiny random-weight ViTModel folder shaped as DINO's, with its ViTImageProcessor (--dino_model)."""
    return build_dino_scorer("tiny", tmp_path_factory.mktemp("tiny_dino") / "dino")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped pipeline folder: two text encoders, text_time conditioning."""
    return build_pipeline("tiny-xl", tmp_path_factory.mktemp("tiny_sdxl") / "pipe")


def make_photo(path: Path, size=(96, 72), seed=0, mode="RGB") -> Path:
    """A smooth random picture (gradients and a blob) so VAE latents are not degenerate."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        channels.append(0.5 + 0.5 * np.sin(3 * (a * x + b * y) + c))
    blob = np.exp(-(((x - rng.uniform(0.2, 0.8)) ** 2 + (y - rng.uniform(0.2, 0.6)) ** 2) / 0.02))
    pixels = (np.stack(channels, -1) * (1 - blob[..., None]) * 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Three small photos of different sizes and formats."""
    folder = tmp_path_factory.mktemp("photos")
    make_photo(folder / "a.png", (96, 72), 1)
    make_photo(folder / "b.jpg", (64, 80), 2)
    make_photo(folder / "c.webp", (72, 72), 3)
    return folder


@pytest.fixture(scope="session")
def other_photos(tmp_path_factory) -> Path:
    """Two photos, none of them among `photos`: a second concept's."""
    folder = tmp_path_factory.mktemp("other_photos")
    make_photo(folder / "front.png", (80, 80), 11)
    make_photo(folder / "back.png", (64, 72), 12)
    return folder


def reset_accelerate_state() -> None:
    """Each in-process run builds its own Accelerator (with its own precision)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def train_once(argv: list[str]):
    """Run textual_inversion.py in this process (for module-scoped fixtures): -> TrainResult."""
    import textual_inversion

    try:
        return textual_inversion.run_training(textual_inversion.parse_args([str(a) for a in argv]))
    finally:
        reset_accelerate_state()


def plan_for(args, family=None, num_images: int = 3, world: int = 1, initializer=None, vae_scale: int = 8):
    """The trainer's plan for parsed `args`, with the model read from its configs when it exists
    (else a stand-in of `family`, SD by default): what the stages after it are given."""
    import infer
    import textual_inversion as ti

    model = Path(args.pretrained_model_name_or_path)
    if model.exists():
        source = ti.read_model_source(args)
    else:
        family = family or infer.StableDiffusion
        source = infer.ModelSource(str(model), ti.MODEL_FLAG, family, str(model), None, None, vae_scale, 12)
    return ti.make_plan(args, world, "no", source, [initializer], [num_images])


def train_args(model: Path, data: Path, out: Path, *extra: str, **flags) -> list[str]:
    """A small, fast command line for the tiny pipelines; keyword flags override defaults."""
    defaults = dict(
        pretrained_model_name_or_path=model,
        train_data_dir=data,
        output_dir=out,
        placeholder_token="<concept>",
        initializer_token="toy",
        resolution=RESOLUTION,
        train_batch_size=1,
        gradient_accumulation_steps=2,
        max_train_steps=4,
        learning_rate=5e-3,
        seed=0,
        report_to="none",
    )
    defaults.update(flags)
    argv = []
    for key, value in defaults.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if value is not True:
            argv.append(str(value))
    return argv + list(extra)


@pytest.fixture
def run_trainer():
    """Run textual_inversion.py in this process: run_trainer(argv) -> TrainResult."""
    return train_once


# Original-layout single files (A1111/ComfyUI), written from tiny folders that keep the real
# block structure, with the project's own converter (bench/models.py). Each file sits beside
# the folder it was written from; the folder doubles as its --single_file_config.


@pytest.fixture(scope="session")
def tiny_sd1_layout(tmp_path_factory) -> Path:
    """A tiny SD 1.x pipeline folder with SD 1.x's block structure (four UNet levels)."""
    return build_pipeline("tiny-sd1-layout", tmp_path_factory.mktemp("tiny_sd1_layout") / "pipe")


@pytest.fixture(scope="session")
def tiny_sd1_file(tiny_sd1_layout) -> Path:
    """tiny_sd1_layout as one original-layout .safetensors file."""
    return write_single_file(tiny_sd1_layout, tiny_sd1_layout.parent / "tiny-sd1.safetensors")


@pytest.fixture(scope="session")
def tiny_sd1_ckpt(tiny_sd1_layout) -> Path:
    """tiny_sd1_layout as one original-layout .ckpt (a torch pickle, weights under state_dict)."""
    return write_single_file(tiny_sd1_layout, tiny_sd1_layout.parent / "tiny-sd1.ckpt")


@pytest.fixture(scope="session")
def tiny_sd2_layout(tmp_path_factory) -> Path:
    """A tiny SD 2.x pipeline folder: SD 2.x's block structure, an OpenCLIP text encoder, v-prediction."""
    folder = tmp_path_factory.mktemp("tiny_sd2_layout") / "pipe"
    return build_pipeline("tiny-sd2-layout", folder, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd2_file(tiny_sd2_layout) -> Path:
    """tiny_sd2_layout as one original-layout .safetensors file (text encoder in the OpenCLIP layout)."""
    return write_single_file(tiny_sd2_layout, tiny_sd2_layout.parent / "tiny-sd2.safetensors")


@pytest.fixture(scope="session")
def tiny_xl_layout(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline folder with SDXL's block structure (three UNet levels)."""
    return build_pipeline("tiny-xl-layout", tmp_path_factory.mktemp("tiny_xl_layout") / "pipe")


@pytest.fixture(scope="session")
def tiny_xl_file(tiny_xl_layout) -> Path:
    """tiny_xl_layout as one original-layout .safetensors file."""
    return write_single_file(tiny_xl_layout, tiny_xl_layout.parent / "tiny-xl.safetensors")


def pytest_collection_modifyitems(config, items) -> None:
    """Whole slow modules first. The workers (-n, pyproject.toml) take whole files in this order,
    so the long ones start early and the many short ones fill in at the end."""
    slow_in: dict[Path, bool] = {}
    for item in items:
        slow_in[item.path] = slow_in.get(item.path, True) and item.get_closest_marker("slow") is not None
    items.sort(key=lambda item: not slow_in[item.path])
