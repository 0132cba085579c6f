#!/usr/bin/env python
"""Textual Inversion for Stable Diffusion 1.x, 2.x and SDXL.

Teaches a frozen text-to-image model a new word from a few photos: the word's rows in the
CLIP token embedding are the only weights trained, against the frozen UNet and VAE with the
ordinary denoising loss. Accepts the flags of diffusers' examples/textual_inversion scripts.

    accelerate launch textual_inversion.py --pretrained_model_name_or_path MODEL \
        --train_data_dir photos/ --placeholder_token "<cat-toy>" --initializer_token toy

The file reads top to bottom as the run does:
    args = parse_args()
    images = TextualInversionDataset(...)          # photos -> square pixels, as-is and mirrored
    models = load_models(args, ...)                # tokenizer(s), text encoder(s), unet, vae, scheduler
    placeholders = add_placeholder_tokens(models, ...)
    concept = encode_concept(images, models, ...)  # cached VAE posteriors + prompt token ids
    train(models, placeholders, concept, args, ...)  # the loop, nothing else
    save_embeddings(placeholders, output_dir)
Why it is fast: every image is encoded by the VAE once, before the loop; each step samples
from the cached posterior (the distribution the reference script re-encodes for every
sample); prompts are tokenized once; the micro-batches of a gradient-accumulation step run
as one UNet call when memory allows; only the new rows carry gradients and optimizer state;
the host waits for the device only at log intervals.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

import infer

logger = logging.getLogger("textual_inversion")
HERE = Path(__file__).resolve().parent
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
CHECKPOINT_STATE = "training_state.pt"


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------
# Command line. Every flag of diffusers' textual_inversion.py is accepted with its meaning.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a Textual Inversion embedding for Stable Diffusion 1.x, 2.x or SDXL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="Hub model id or local diffusers folder.")
    g.add_argument("--revision", default=None, help="Model revision (branch, tag or commit) on the Hub.")
    g.add_argument("--variant", default=None, help="Weight file variant to load, e.g. fp16.")
    g.add_argument("--tokenizer_name", default=None, help="Tokenizer id or path, if not the model's own.")
    g.add_argument("--train_data_dir", required=True, help="Folder with the concept's photos (3-5 are typical).")
    g.add_argument("--placeholder_token", required=True, help='The new word, e.g. "<cat-toy>".')
    g.add_argument("--initializer_token", required=True, help="One existing token the new word starts from.")
    g.add_argument("--learnable_property", default="object", choices=["object", "style"])
    g.add_argument("--num_vectors", type=int, default=1, help="Embedding vectors the new word is made of.")
    g.add_argument(
        "--repeats", type=int, default=100, help="Passes over the photos per epoch (sets the shuffling period)."
    )
    g.add_argument("--resolution", type=int, default=512, help="Training size in pixels (a multiple of 8).")
    g.add_argument("--center_crop", action="store_true", help="Crop each photo to its centre square first.")
    g.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Threads decoding photos before training (no data loading happens during training).",
    )

    g = p.add_argument_group("optimization")
    g.add_argument("--seed", type=int, default=None, help="Seed for a reproducible run (random if unset).")
    g.add_argument("--train_batch_size", type=int, default=16, help="Samples per micro-batch per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument(
        "--micro_batch_size",
        type=int,
        default=None,
        help="Samples per UNet call. Default: a whole optimizer step's batch (train_batch_size x "
        "gradient_accumulation_steps) in one call, the same gradient as accumulation but faster; "
        "on a CUDA out-of-memory error it halves by itself.",
    )
    g.add_argument("--num_train_epochs", type=int, default=100, help="Used only if --max_train_steps is unset.")
    g.add_argument("--max_train_steps", type=int, default=5000, help="Optimizer steps to train.")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="Multiply the lr by batch x accumulation x processes.")
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=[
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
        ],
    )
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts for cosine_with_restarts.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--gradient_checkpointing", action="store_true", help="Less memory, slower steps.")
    g.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Precision of the frozen models (trained rows stay fp32). Default: accelerate's config, else no.",
    )
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    g.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention if installed (PyTorch's SDPA, the default, is as fast).",
    )
    g.add_argument("--local_rank", type=int, default=-1, help="Set by launchers; accelerate handles it.")

    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default="text-inversion-model")
    g.add_argument("--save_steps", type=int, default=500, help="Write learned_embeds-steps-N every N steps.")
    g.add_argument(
        "--save_as_full_pipeline", action="store_true", help="Also save the whole pipeline with the new word."
    )
    g.add_argument("--no_safe_serialization", action="store_true", help="Write .bin files instead of .safetensors.")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Write a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in --output_dir.')
    g.add_argument("--logging_steps", type=int, default=10, help="Read the loss back from the device every N steps.")
    g.add_argument(
        "--report_to",
        default=None,
        help="Tracker: tensorboard, wandb, comet_ml, all or none. Default: tensorboard if it is installed.",
    )
    g.add_argument("--logging_dir", default="logs", help="Tracker folder, inside --output_dir.")

    g = p.add_argument_group("validation and the Hub")
    g.add_argument("--validation_prompt", default=None, help="Prompt for validation images.")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=100)
    g.add_argument("--validation_epochs", type=int, default=None, help="Deprecated: use --validation_steps.")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_token", default=None)
    g.add_argument("--hub_model_id", default=None)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    checks = [
        (args.num_vectors >= 1, f"--num_vectors must be at least 1 (got {args.num_vectors})"),
        (
            args.resolution >= 8 and args.resolution % 8 == 0,
            f"--resolution must be a multiple of 8 (got {args.resolution})",
        ),
        (args.train_batch_size >= 1, "--train_batch_size must be at least 1"),
        (args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (args.micro_batch_size is None or args.micro_batch_size >= 1, "--micro_batch_size must be at least 1"),
        (args.repeats >= 1, "--repeats must be at least 1"),
        (args.max_train_steps is None or args.max_train_steps >= 1, "--max_train_steps must be at least 1"),
        (args.save_steps >= 1 and args.checkpointing_steps >= 1, "--save_steps and --checkpointing_steps must be >= 1"),
        (args.logging_steps >= 1, "--logging_steps must be at least 1"),
        (
            args.checkpoints_total_limit is None or args.checkpoints_total_limit >= 1,
            "--checkpoints_total_limit must be >= 1",
        ),
        (args.placeholder_token.strip() != "", "--placeholder_token must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; give a folder path")
    if args.validation_epochs is not None:
        logger.warning("--validation_epochs is deprecated; use --validation_steps")
    return args


# ----------------------------------------------------------------------------------------
# Images: every readable photo in the folder, as a square of --resolution pixels.


def list_images(folder: Path) -> list[Path]:
    """Image files in `folder`, sorted; anything else is skipped with one warning."""
    if not folder.exists():
        raise UserError(f"--train_data_dir {folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"--train_data_dir {folder}: not a folder")
    entries = sorted(folder.iterdir())
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in images]
    if not images:
        found = f" (it holds: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})" if skipped else ""
        raise UserError(f"--train_data_dir {folder}: no images (png, jpg, webp, bmp, tiff, gif) found{found}")
    if skipped:
        logger.warning("Skipping %d non-image entries in %s: %s", len(skipped), folder, ", ".join(skipped))
    return images


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully, upright per its EXIF, as RGB with any transparency on white."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat that as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as stored:
                stored.load()  # decode now, so a truncated file fails here with its name
                return to_rgb(ImageOps.exif_transpose(stored))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{path}: too many pixels to open safely ({e}); downscale it") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot read this image ({e}); remove or replace it") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greyscale: Pillow cannot convert these to RGB directly.
        values = np.asarray(image, dtype=np.float32)
        if values.max(initial=0) > 255:
            values = values / 257.0
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(values.clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")  # keeps palette transparency
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def square_pixels(image: Image.Image, size: int, center_crop: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize (after an optional centre-square crop) to size x size, bicubic.

    Returns uint8 HxWx3 pixels and the crop's top-left corner in the resized frame, which
    SDXL is conditioned on.
    """
    width, height = image.size
    crop_top_left = (0, 0)
    if center_crop:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        crop_top_left = (round(top * size / side), round(left * size / side))
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8), crop_top_left


def read_templates(learnable_property: str) -> list[str]:
    path = HERE / "templates" / f"{learnable_property}.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if "{}" in line]


class TextualInversionDataset(torch.utils.data.Dataset):
    """The concept's examples: each photo as a square, as-is and mirrored, plus its prompts.

    `dataset[i]` decodes photo i: `pixel_values` [2, 3, size, size] in [-1, 1] (as-is,
    mirrored), `original_size` (h, w) and `crop_top_left` (y, x). `prompts` are the
    templates of --learnable_property with the placeholder string in them.
    """

    def __init__(
        self,
        data_root: str | Path,
        size: int = 512,
        center_crop: bool = False,
        learnable_property: str = "object",
        placeholder_token: str = "*",
    ):
        self.image_paths = list_images(Path(data_root))
        self.size = size
        self.center_crop = center_crop
        self.templates = read_templates(learnable_property)
        self.prompts = [t.replace("{}", placeholder_token) for t in self.templates]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> dict:
        image = open_rgb(self.image_paths[i])
        pixels, crop_top_left = square_pixels(image, self.size, self.center_crop)
        both = np.stack([pixels, pixels[:, ::-1]])  # the horizontal flip, p=0.5 at training time
        tensor = torch.from_numpy(both.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        return {
            "pixel_values": tensor.contiguous(),
            "original_size": (image.height, image.width),
            "crop_top_left": crop_top_left,
        }


def decode_images(dataset: TextualInversionDataset, workers: int) -> list[dict]:
    """Decode every photo once (in threads: Pillow releases the GIL), failing on the first bad one."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(dataset.__getitem__, range(len(dataset))))


# ----------------------------------------------------------------------------------------
# Models. SD 1.x/2.x and SDXL differ only in the two small classes below.


class StableDiffusion:
    """SD 1.x and 2.x: one CLIP text encoder; the UNet attends to its last hidden states."""

    name = "Stable Diffusion 1.x/2.x"
    encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)

    @staticmethod
    def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], size: int) -> list[int] | None:
        return None

    @staticmethod
    def condition(text_encoders: list, prompt_ids: list[torch.Tensor], time_ids: torch.Tensor | None):
        return text_encoders[0](prompt_ids[0])[0], None


class StableDiffusionXL:
    """SDXL, exactly as its diffusers pipeline conditions at inference: both encoders'
    penultimate hidden states side by side, the second encoder's pooled projection, and each
    image's size and crop as `time_ids`."""

    name = "Stable Diffusion XL"
    encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")

    @staticmethod
    def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], size: int) -> list[int]:
        return [*original_size, *crop_top_left, size, size]

    @staticmethod
    def condition(text_encoders: list, prompt_ids: list[torch.Tensor], time_ids: torch.Tensor):
        first = text_encoders[0](prompt_ids[0], output_hidden_states=True)
        # Run through the model's own forward so the pooled position is chosen exactly as at
        # inference (with eos_token_id=2 configs transformers pools at the highest token id,
        # which is the placeholder's when the prompt contains it).
        second = text_encoders[1](prompt_ids[1], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return hidden, {"text_embeds": second.text_embeds, "time_ids": time_ids}


@dataclass
class Models:
    family: type[StableDiffusion] | type[StableDiffusionXL]
    tokenizers: list
    text_encoders: list
    unet: nn.Module
    vae: nn.Module | None
    noise_scheduler: object
    weight_dtype: torch.dtype
    source: str


def read_model_index(name: str, revision: str | None) -> dict:
    """model_index.json of a local folder or a Hub repo, with one-line errors for both."""
    path = Path(name)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise UserError(
                f"--pretrained_model_name_or_path {name}: no model_index.json, so not a diffusers Stable "
                "Diffusion folder (expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        return json.loads(index.read_text())
    if path.exists() or name.endswith((".safetensors", ".ckpt", ".pt")):
        raise UserError(
            f"--pretrained_model_name_or_path {name}: single-file checkpoints are not supported; "
            "give a diffusers folder or a Hub id (convert with diffusers' from_single_file + save_pretrained)"
        )
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(name, "model_index.json", revision=revision)).read_text())
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--pretrained_model_name_or_path {name}: not a local folder, and the Hub could not provide it ({reason})"
        ) from None


def model_family(index: dict, name: str) -> type[StableDiffusion] | type[StableDiffusionXL]:
    if all(k in index for k in ("text_encoder", "text_encoder_2", "unet", "vae")):
        return StableDiffusionXL
    if all(k in index for k in ("text_encoder", "tokenizer", "unet", "vae")):
        return StableDiffusion
    parts = ", ".join(k for k in index if not k.startswith("_"))
    raise UserError(
        f"--pretrained_model_name_or_path {name}: {index.get('_class_name', 'this pipeline')} ({parts}) "
        "is not a Stable Diffusion 1.x/2.x/XL text-to-image pipeline"
    )


def load_models(args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype) -> Models:
    """Tokenizer(s), text encoder(s), UNet, VAE and noise scheduler, frozen, on `device`.

    The UNet and text encoders load straight into the training precision; the VAE loads in
    fp32 because it encodes each photo once, where fp32 costs nothing and avoids SDXL's fp16
    VAE overflow.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    name = args.pretrained_model_name_or_path
    family = model_family(read_model_index(name, args.revision), name)
    common = dict(revision=args.revision)

    def load(what: str, loader, **kwargs):
        try:
            return loader(**kwargs)
        except (OSError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--pretrained_model_name_or_path {name}: cannot load {what} ({first_line})") from None

    tokenizers = []
    for i, sub in enumerate(family.tokenizers):
        if args.tokenizer_name and i == 0:
            tok = load(
                "--tokenizer_name", CLIPTokenizer.from_pretrained, pretrained_model_name_or_path=args.tokenizer_name
            )
        else:
            tok = load(sub, CLIPTokenizer.from_pretrained, pretrained_model_name_or_path=name, subfolder=sub, **common)
        tokenizers.append(tok)
    text_encoders = []
    for sub, cls in zip(family.encoders, (CLIPTextModel, CLIPTextModelWithProjection)):
        encoder = load(
            sub,
            cls.from_pretrained,
            pretrained_model_name_or_path=name,
            subfolder=sub,
            variant=args.variant,
            dtype=weight_dtype,
            **common,
        )
        text_encoders.append(encoder)
    unet = load(
        "unet",
        UNet2DConditionModel.from_pretrained,
        pretrained_model_name_or_path=name,
        subfolder="unet",
        variant=args.variant,
        torch_dtype=weight_dtype,
        **common,
    )
    vae = load(
        "vae",
        AutoencoderKL.from_pretrained,
        pretrained_model_name_or_path=name,
        subfolder="vae",
        variant=args.variant,
        torch_dtype=torch.float32,
        **common,
    )
    noise_scheduler = load(
        "scheduler", DDPMScheduler.from_pretrained, pretrained_model_name_or_path=name, subfolder="scheduler", **common
    )
    for module in (*text_encoders, unet, vae):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in text_encoders:
            encoder.gradient_checkpointing_enable()
            encoder.train()  # transformers checkpoints only in train mode; CLIP has no dropout
    if args.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:
            logger.warning("xformers attention unavailable (%s); using PyTorch's SDPA attention", e)
    return Models(family, tokenizers, text_encoders, unet, vae, noise_scheduler, weight_dtype, name)


# ----------------------------------------------------------------------------------------
# The new word: N tokens per tokenizer, their rows the only trainable weights.


class PlaceholderEmbedding(nn.Module):
    """A text encoder's token embedding with the placeholder rows read from a separate table.

    The frozen vocabulary is untouched (no 49,408-row gradient or optimizer state exists),
    and the trainable rows stay fp32 whatever precision the encoder runs in. The rows are
    held as a plain attribute, not a registered parameter, so the encoder's `.dtype`,
    `.to()` and `.parameters()` see only its frozen weights.
    """

    def __init__(self, frozen: nn.Embedding, first_id: int, rows: torch.Tensor):
        super().__init__()
        self.frozen = frozen
        self.first_id = first_id
        self.rows = rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.rows.shape[0]
        is_new = (input_ids >= self.first_id) & (input_ids < self.first_id + n)
        known = self.frozen(input_ids.clamp(max=self.frozen.num_embeddings - 1))
        new = F.embedding((input_ids - self.first_id).clamp(0, n - 1), self.rows).to(known.dtype)
        return torch.where(is_new.unsqueeze(-1), new, known)


@dataclass
class Placeholders:
    tokens: list[str]  # "<cat-toy>", "<cat-toy>_1", ... (diffusers' multi-vector naming)
    ids: list[list[int]]  # per tokenizer
    rows: list[torch.Tensor]  # per text encoder, fp32 [N, D]: the only trainable weights

    @property
    def token(self) -> str:
        return self.tokens[0]


def add_placeholder_tokens(models: Models, placeholder: str, initializer: str, num_vectors: int) -> Placeholders:
    tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]
    all_ids, all_rows = [], []
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        init_ids = tokenizer.encode(initializer, add_special_tokens=False)
        if len(init_ids) != 1:
            pieces = " + ".join(tokenizer.convert_ids_to_tokens(init_ids)) or "nothing"
            raise UserError(
                f"--initializer_token {initializer!r} is {len(init_ids)} tokens ({pieces}); "
                "choose a word that is exactly one token"
            )
        suggestion = f"choose a new string such as <{placeholder.strip('<>')}-concept>"
        pieces = tokenizer.tokenize(placeholder)
        if len(pieces) == 1 and pieces[0] != placeholder and pieces[0] in tokenizer.get_vocab():
            # e.g. "toy" -> "toy</w>": as an added token it would take over the real word everywhere.
            raise UserError(
                f"--placeholder_token {placeholder!r} is already a word the model knows ({pieces[0]}); {suggestion}"
            )
        taken = [t for t in tokens if t in tokenizer.get_vocab()]
        if taken or tokenizer.add_tokens(tokens) != num_vectors:
            raise UserError(
                f"--placeholder_token {placeholder!r}: {(taken or tokens)[0]!r} is already in the tokenizer's "
                f"vocabulary; {suggestion}"
            )
        ids = tokenizer.convert_tokens_to_ids(tokens)
        assert ids == list(range(ids[0], ids[0] + num_vectors)), ids
        frozen = encoder.get_input_embeddings()
        rows = frozen.weight[init_ids[0]].detach().float().repeat(num_vectors, 1).requires_grad_(True)
        encoder.set_input_embeddings(PlaceholderEmbedding(frozen, ids[0], rows))
        all_ids.append(ids)
        all_rows.append(rows)
    return Placeholders(tokens, all_ids, all_rows)


# ----------------------------------------------------------------------------------------
# The concept: what the loop reads each step, computed once.


@dataclass
class Concept:
    latent_mean: torch.Tensor  # [images, 2 (as-is, mirrored), C, h, w], in the UNet's latent scale
    latent_std: torch.Tensor  # same shape
    prompt_ids: list[torch.Tensor]  # per tokenizer: [templates, 77]
    time_ids: torch.Tensor | None  # SDXL: [images, 6]
    prompts: list[str]

    @property
    def num_images(self) -> int:
        return self.latent_mean.shape[0]


@torch.no_grad()
def encode_concept(
    examples: list[dict], prompts: list[str], models: Models, placeholders: Placeholders, size: int
) -> Concept:
    """VAE posteriors of every photo and its mirror, and the prompts' token ids, on device.

    Sampling mean + std * noise each step draws from the same distribution as encoding the
    photo every step, as the reference script does, at none of the cost.
    """
    vae = models.vae
    device = next(vae.parameters()).device
    means, stds = [], []
    for example in examples:
        posterior = vae.encode(example["pixel_values"].to(device, torch.float32)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latent_mean = (torch.stack(means) - shift) * scale
    latent_std = torch.stack(stds) * scale

    prompt_ids = []
    for tokenizer, ids in zip(models.tokenizers, placeholders.ids):
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for prompt, row in zip(prompts, tokens):
            found = [int((row == i).sum()) for i in ids]
            if found != [1] * len(ids):
                raise UserError(
                    f"--placeholder_token {placeholders.token!r} does not tokenize as one new token in the "
                    f"prompt {prompt!r} (each placeholder id found {found} times); use a distinctive "
                    "lowercase string such as <my-concept>"
                )
        prompt_ids.append(tokens.to(device))

    time_ids = [models.family.time_ids(e["original_size"], e["crop_top_left"], size) for e in examples]
    time_ids = None if time_ids[0] is None else torch.tensor(time_ids, dtype=torch.float32, device=device)
    return Concept(latent_mean, latent_std, prompt_ids, time_ids, prompts)


# ----------------------------------------------------------------------------------------
# Randomness: a pure function of (seed, step), so a resumed run repeats the uninterrupted
# one exactly with nothing but the step stored, and any number of processes split the
# same global batch.


def derive_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


STREAM_ORDER, STREAM_STEP, STREAM_VALIDATION = 1, 2, 3


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(derive_seed(seed, STREAM_ORDER, epoch))
    return torch.randperm(length, generator=generator, device=device)


def sample_images(seed: int, start: int, count: int, num_images: int, repeats: int, device) -> torch.Tensor:
    """Image index of samples start..start+count of the run's sample stream.

    The stream is a sequence of epochs; each epoch shows every image `repeats` times in a
    shuffled order, as a shuffled DataLoader over images x repeats would.
    """
    length = num_images * repeats
    parts, position = [], start
    while position < start + count:
        epoch, offset = divmod(position, length)
        take = min(length - offset, start + count - position)
        parts.append(epoch_order(seed, epoch, length, device)[offset : offset + take])
        position += take
    return torch.cat(parts) % num_images


@dataclass
class Batch:
    image: torch.Tensor  # [B] photo index
    flip: torch.Tensor  # [B] 0 as-is, 1 mirrored
    template: torch.Tensor  # [B] prompt template index
    timesteps: torch.Tensor  # [B]
    posterior_noise: torch.Tensor  # [B, C, h, w] draws the latent from the cached posterior
    noise: torch.Tensor  # [B, C, h, w] the diffusion noise

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitem__(self, s: slice) -> Batch:
        return Batch(*(getattr(self, f)[s] for f in self.__dataclass_fields__))


def draw_batch(generator: torch.Generator, image: torch.Tensor, concept: Concept, num_timesteps: int) -> Batch:
    device, b = image.device, image.shape[0]
    shape = (b, *concept.latent_mean.shape[2:])
    return Batch(
        image=image,
        flip=torch.randint(0, 2, (b,), generator=generator, device=device),
        template=torch.randint(0, len(concept.prompts), (b,), generator=generator, device=device),
        timesteps=torch.randint(0, num_timesteps, (b,), generator=generator, device=device),
        posterior_noise=torch.randn(shape, generator=generator, device=device),
        noise=torch.randn(shape, generator=generator, device=device),
    )


def denoising_loss(models: Models, concept: Concept, batch: Batch) -> torch.Tensor:
    """Per-sample MSE of the UNet's prediction (epsilon or v, per the scheduler config)."""
    latents = concept.latent_mean[batch.image, batch.flip]
    latents = latents + concept.latent_std[batch.image, batch.flip] * batch.posterior_noise
    scheduler = models.noise_scheduler
    noisy = scheduler.add_noise(latents, batch.noise, batch.timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = batch.noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, batch.noise, batch.timesteps)
    else:
        raise UserError(f"scheduler prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
    prompt_ids = [ids[batch.template] for ids in concept.prompt_ids]
    time_ids = None if concept.time_ids is None else concept.time_ids[batch.image]
    hidden, added = models.family.condition(models.text_encoders, prompt_ids, time_ids)
    prediction = models.unet(
        noisy.to(models.weight_dtype), batch.timesteps, hidden.to(models.weight_dtype), added_cond_kwargs=added
    ).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------
# Training.


@dataclass
class RunState:
    """What a checkpoint holds: enough to continue bit for bit."""

    step: int
    seed: int
    extra: dict = field(default_factory=dict)


def make_optimizer(rows: list[torch.Tensor], args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        rows,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def total_steps(args: argparse.Namespace, num_images: int, world_size: int) -> int:
    if args.max_train_steps is not None:
        return args.max_train_steps
    per_step = args.train_batch_size * args.gradient_accumulation_steps * world_size
    return args.num_train_epochs * math.ceil(num_images * args.repeats / per_step)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    samples_per_second: float
    final_loss: float | None


def accumulate_gradients(models: Models, concept: Concept, batch: Batch, chunk: int, scaler) -> torch.Tensor:
    """Backward the batch's mean loss in chunks of `chunk` samples; return the loss (on device).

    Each chunk's loss is weighted by its share of the batch, so any chunking gives the
    gradient of the mean over the whole batch: the same as gradient accumulation.
    """
    total = torch.zeros((), device=batch.image.device)
    for start in range(0, len(batch), chunk):
        part = batch[slice(start, start + chunk)]
        loss = denoising_loss(models, concept, part).sum() / len(batch)
        scaler.scale(loss).backward()
        total += loss.detach()
    return total


def train(
    models: Models,
    placeholders: Placeholders,
    concept: Concept,
    args: argparse.Namespace,
    accelerator,
    state: RunState,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """The training loop: one optimizer step per iteration, nothing else on the hot path."""
    from diffusers.optimization import get_scheduler

    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    per_process = args.train_batch_size * args.gradient_accumulation_steps
    global_batch = per_process * world
    max_steps = total_steps(args, concept.num_images, world)
    lr = args.learning_rate * (per_process * world if args.scale_lr else 1)
    optimizer = make_optimizer(placeholders.rows, args, lr)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_steps,
        num_cycles=args.lr_num_cycles,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=models.weight_dtype == torch.float16)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        lr_scheduler.load_state_dict(optimizer_state["lr_scheduler"])
        scaler.load_state_dict(optimizer_state["grad_scaler"])

    def snapshot() -> dict:
        return {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "grad_scaler": scaler.state_dict(),
        }

    chunk = args.micro_batch_size or per_process
    generator = torch.Generator(device)
    progress = tqdm_bar(max_steps, state.step, accelerator.is_local_main_process)
    loss_sum, loss_count = torch.zeros((), device=device), 0
    last_loss = None
    started = window_start = time.perf_counter()
    first_step, window_steps = state.step, 0
    try:
        while state.step < max_steps:
            # Every process draws the whole global batch and keeps its own slice: N processes
            # compute exactly what one process would with N times the batch.
            generator.manual_seed(derive_seed(state.seed, STREAM_STEP, state.step))
            images = sample_images(
                state.seed, state.step * global_batch, global_batch, concept.num_images, args.repeats, device
            )
            batch = draw_batch(generator, images, concept, models.noise_scheduler.config.num_train_timesteps)
            batch = batch[slice(rank * per_process, (rank + 1) * per_process)]
            while True:
                try:
                    loss = accumulate_gradients(models, concept, batch, chunk, scaler)
                    break
                except torch.OutOfMemoryError:
                    if chunk == 1:
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    chunk = (chunk + 1) // 2
                    logger.warning("Out of GPU memory; retrying with --micro_batch_size %d", chunk)
            if world > 1:
                for rows in placeholders.rows:
                    torch.distributed.all_reduce(rows.grad)
                    rows.grad /= world
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            state.step += 1
            window_steps += 1
            loss_sum += loss
            loss_count += 1
            progress.update(1)

            if state.step % args.logging_steps == 0 or state.step == max_steps:
                last_loss = (loss_sum / loss_count).item()  # the one host sync, once per interval
                now = time.perf_counter()
                speed = window_steps * global_batch / (now - window_start)
                logs = {"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0], "samples_per_second": speed}
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['lr']:.2e}", samples_s=f"{speed:.1f}")
                accelerator.log(logs, step=state.step)
                loss_sum.zero_()
                loss_count, window_start, window_steps = 0, now, 0
            if accelerator.is_main_process:
                if state.step % args.save_steps == 0 and state.step < max_steps:
                    save_embeddings(placeholders, models, args, suffix=f"-steps-{state.step}", with_extras=False)
                if state.step % args.checkpointing_steps == 0 and state.step < max_steps:
                    save_checkpoint(args, placeholders, models, state, snapshot())
    except KeyboardInterrupt:
        progress.close()
        if accelerator.is_main_process and state.step > first_step:
            path = save_checkpoint(args, placeholders, models, state, snapshot())
            raise UserError(
                f"interrupted at step {state.step}; saved {path}; continue with --resume_from_checkpoint latest"
            ) from None
        raise UserError(f"interrupted at step {state.step}") from None
    progress.close()
    seconds = time.perf_counter() - started
    done = state.step - first_step
    return TrainResult(state.step, seconds, done * global_batch / max(seconds, 1e-9), last_loss)


def tqdm_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="Steps", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------
# Files: embeddings, checkpoints, the full pipeline. Every file is written atomically.


def embedding_files(placeholders: Placeholders, models: Models, args: argparse.Namespace, suffix: str) -> dict:
    """{file name: tensors} for the embedding files of one moment of training."""
    token, rows = placeholders.token, placeholders.rows
    ext = ".bin" if args.no_safe_serialization else ".safetensors"
    files = {f"learned_embeds{suffix}{ext}": {token: rows[0]}}
    if models.family is StableDiffusionXL:
        files[f"learned_embeds_2{suffix}{ext}"] = {token: rows[1]}
    return files


def save_embeddings(
    placeholders: Placeholders, models: Models, args: argparse.Namespace, suffix: str = "", with_extras: bool = True
) -> list[Path]:
    """learned_embeds files (+ .bin, token_identifier.txt, type_of_concept.txt when final)."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        infer.write_tensors(out / name, tensors)
        for name, tensors in embedding_files(placeholders, models, args, suffix).items()
    ]
    if with_extras:
        if models.family is StableDiffusion and not args.no_safe_serialization:
            written.append(
                infer.write_diffusers_embedding(out / "learned_embeds.bin", placeholders.token, placeholders.rows[0])
            )
        if models.family is StableDiffusionXL:
            name = infer.file_name_for_token(placeholders.token) + ".safetensors"
            written.append(infer.write_sdxl_embedding(out / name, placeholders.rows[0], placeholders.rows[1]))
        written.append(infer.write_text(out / "token_identifier.txt", placeholders.token))
        written.append(infer.write_text(out / "type_of_concept.txt", args.learnable_property))
    return written


def save_checkpoint(
    args: argparse.Namespace, placeholders: Placeholders, models: Models, state: RunState, optimizer_state: dict
) -> Path:
    """checkpoint-N/: the rows, optimizer, lr schedule, step and seed (kilobytes), plus the
    embedding as it stands, loadable like any output folder."""
    out = Path(args.output_dir)
    final = out / f"checkpoint-{state.step}"
    tmp = out / f".checkpoint-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    payload = {
        "format": "textual-inversion-checkpoint/1",
        "step": state.step,
        "seed": state.seed,
        "tokens": placeholders.tokens,
        "rows": [r.detach().cpu() for r in placeholders.rows],
        "batch": [args.train_batch_size, args.gradient_accumulation_steps],
        "extra": state.extra,
        **optimizer_state,
    }
    infer.atomic_write(tmp / CHECKPOINT_STATE, lambda path: torch.save(payload, path))
    for name, tensors in embedding_files(placeholders, models, args, "").items():
        infer.write_tensors(tmp / name, tensors)
    infer.write_text(tmp / "token_identifier.txt", placeholders.token)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    logger.info("Saved checkpoint %s", final)
    if args.checkpoints_total_limit is not None:
        for old in list_checkpoints(out)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    found = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        if step.isdigit() and (path / CHECKPOINT_STATE).exists():
            found.append((int(step), path))
    return [p for _, p in sorted(found)]


def find_checkpoint(args: argparse.Namespace) -> Path | None:
    """The folder --resume_from_checkpoint names (None: start fresh), with one-line errors."""
    value = args.resume_from_checkpoint
    if not value:
        return None
    out = Path(args.output_dir)
    if value == "latest":
        found = list_checkpoints(out) if out.is_dir() else []
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s; starting from step 0", out)
            return None
        return found[-1]
    path = Path(value)
    if not path.exists() and (out / value).exists():
        path = out / value  # the reference script resolves names inside --output_dir
    if not path.exists():
        raise UserError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if not (path / CHECKPOINT_STATE).exists():
        raise UserError(
            f"--resume_from_checkpoint {value}: no {CHECKPOINT_STATE} inside, so not a checkpoint of this "
            "trainer (a diffusers-script checkpoint cannot be resumed here; start a new run)"
        )
    return path


def load_checkpoint(path: Path, placeholders: Placeholders, args: argparse.Namespace) -> tuple[RunState, dict]:
    payload = torch.load(path / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    if payload.get("tokens") != placeholders.tokens:
        raise UserError(
            f"--resume_from_checkpoint {path}: it trained {payload.get('tokens')}, not {placeholders.tokens}; "
            "use the same --placeholder_token and --num_vectors"
        )
    if payload["batch"] != [args.train_batch_size, args.gradient_accumulation_steps]:
        logger.warning("Resuming with a different batch size than %s was trained with; the run will differ", path)
    if args.seed is not None and args.seed != payload["seed"]:
        logger.warning("Resuming with the checkpoint's seed %d, not --seed %d", payload["seed"], args.seed)
    with torch.no_grad():
        for rows, saved in zip(placeholders.rows, payload["rows"]):
            rows.copy_(saved)
    state = RunState(payload["step"], payload["seed"], payload.get("extra", {}))
    return state, {k: payload[k] for k in ("optimizer", "lr_scheduler", "grad_scaler")}


def save_full_pipeline(args: argparse.Namespace, models: Models, output_dir: Path) -> None:
    """The source pipeline, reloaded at its stored precision, with the new word loaded into it
    by the same loader users call; written beside the embedding files."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(models.source, revision=args.revision, variant=args.variant)
    infer.load_embedding(pipe, output_dir)
    tmp = output_dir / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    for item in sorted(tmp.iterdir()):
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


# ----------------------------------------------------------------------------------------
# The run.


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = resolve_report_to(args.report_to)
    config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir)
    )
    return Accelerator(mixed_precision=args.mixed_precision, log_with=report_to, project_config=config)


def resolve_report_to(value: str | None) -> list[str] | None:
    """Tracker names; a named tracker that is not installed is a one-line error."""
    import importlib.util

    if value is None:  # not given: tensorboard if present, like the reference, else none
        return (
            ["tensorboard"]
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
            else None
        )
    if value in ("none", ""):
        return None
    names = ["tensorboard", "wandb", "comet_ml"] if value == "all" else [v.strip() for v in value.split(",")]
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",)}
    for name in names:
        if name not in packages:
            raise UserError(f"--report_to {value}: unknown tracker {name!r} (tensorboard, wandb, comet_ml, all, none)")
        if not any(importlib.util.find_spec(m) for m in packages[name]):
            raise UserError(
                f"--report_to {name}: {name} is not installed; pip install {name}, or pass --report_to none"
            )
    return names


def tracker_config(args: argparse.Namespace) -> dict:
    """The run's settings for trackers: plain values only, never the Hub token."""
    return {k: v for k, v in vars(args).items() if k != "hub_token" and isinstance(v, (int, float, str, bool))}


def resolve_seed(args: argparse.Namespace, accelerator) -> int:
    """--seed, or a fresh one shared by all processes (they must agree on the data order)."""
    if args.seed is not None:
        return args.seed
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    try:
        run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> TrainResult:
    import diffusers
    import transformers

    accelerator = make_accelerator(args)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[accelerator.mixed_precision]
    checkpoint = find_checkpoint(args)

    # Everything that can fail on the user's input fails here, before a file is written.
    placeholder_string = " ".join(
        [args.placeholder_token] + [f"{args.placeholder_token}_{i}" for i in range(1, args.num_vectors)]
    )
    dataset = TextualInversionDataset(
        args.train_data_dir, args.resolution, args.center_crop, args.learnable_property, placeholder_string
    )
    examples = decode_images(dataset, args.dataloader_num_workers)
    models = load_models(args, accelerator.device, weight_dtype)
    placeholders = add_placeholder_tokens(models, args.placeholder_token, args.initializer_token, args.num_vectors)
    concept = encode_concept(examples, dataset.prompts, models, placeholders, args.resolution)
    del examples
    models.vae = None  # encoded once; the loop never needs it
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    if checkpoint is not None:
        state, optimizer_state = load_checkpoint(checkpoint, placeholders, args)
        logger.info("Resuming from %s (step %d)", checkpoint, state.step)
    else:
        state, optimizer_state = RunState(step=0, seed=resolve_seed(args, accelerator)), None

    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers("textual_inversion", config=tracker_config(args))
    world = accelerator.num_processes
    logger.info(
        "%s: %d photos, %d prompts, %d vector(s) of width %s, %d steps x %d samples (%d process(es)), seed %d",
        models.family.name,
        concept.num_images,
        len(concept.prompts),
        args.num_vectors,
        "+".join(str(r.shape[1]) for r in placeholders.rows),
        total_steps(args, concept.num_images, world),
        args.train_batch_size * args.gradient_accumulation_steps * world,
        world,
        state.seed,
    )
    result = train(models, placeholders, concept, args, accelerator, state, optimizer_state)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        written = save_embeddings(placeholders, models, args)
        if args.save_as_full_pipeline:
            save_full_pipeline(args, models, out)
        logger.info(
            "Done: %d steps in %.1f s (%.1f samples/s); embedding in %s",
            result.steps,
            result.seconds,
            result.samples_per_second,
            written[0],
        )
    accelerator.end_training()
    return result


if __name__ == "__main__":
    sys.exit(main())
