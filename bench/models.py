"""Random-weight Stable Diffusion pipelines of known shapes, built offline from configs.

Speed and memory depend on tensor shapes, not on weight values, so a random-weight model
of the real shape gives honest timings without downloading anything. The tests use the
`tiny` shapes; the benchmarks use `sd15` and `sdxl` as well.

    python bench/models.py sd15 /tmp/sd15          # writes a diffusers folder
    python bench/models.py tiny /tmp/tiny --vocab tiny

Tokenizers: `tiny` vocabularies are trained here with a few lines of BPE over a word list;
`clip` is the real 49,408-token CLIP vocabulary, read from the `bpe_simple_vocab_16e6.txt.gz`
that open_clip_torch's wheel carries (fetched with `pip download --no-deps`, never installed).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import itertools
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / ".cache"

# Words the tiny vocabulary knows as single tokens: the template words, the class words of
# the DreamBooth subjects, and a few more so prompts in tests read naturally.
TINY_WORDS = (
    "a an the of in on with my one photo rendering cropped clean dirty dark cool close-up close up "
    "bright good rendition nice small weird large painting picture style toy cat dog duck teapot "
    "backpack cartoon red blue green sks person face sculpture car house tree flower on beach"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def train_bpe(words: list[str], max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over a word list, CLIP style (the last symbol of a word carries '</w>')."""
    byte_map = bytes_to_unicode()
    corpus = collections.Counter()
    for word in words:
        symbols = [byte_map[b] for b in word.lower().encode("utf-8")]
        symbols[-1] += "</w>"
        corpus[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs = collections.Counter()
        for symbols, count in corpus.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for symbols, count in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        corpus = merged
    return merges


def real_clip_merges() -> list[tuple[str, str]]:
    """The 48,894 merges of the real CLIP vocabulary, from open_clip_torch's wheel (cached)."""
    cached = CACHE / "bpe_simple_vocab_16e6.txt.gz"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "open_clip_torch"]
            if subprocess.run(command, check=False).returncode != 0:
                raise SystemExit(
                    f"could not download open_clip_torch for its CLIP vocabulary; on a machine without "
                    f"PyPI, copy bpe_simple_vocab_16e6.txt.gz (from any open_clip_torch wheel, or from "
                    f"{CACHE} on another machine) to {cached}"
                )
            (wheel,) = glob.glob(f"{tmp}/open_clip_torch-*.whl")
            with zipfile.ZipFile(wheel) as zf:
                (name,) = [n for n in zf.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz")]
                cached.write_bytes(zf.read(name))
    with gzip.open(cached, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The file's first line is a header; CLIP uses the next 49152 - 256 - 2 merges.
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]


def write_clip_tokenizer_files(folder: Path, merges: list[tuple[str, str]]) -> int:
    """Write vocab.json and merges.txt as CLIP lays them out; return the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def make_tokenizer(vocab: str, folder: Path, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer with the `tiny` (trained here) or `clip` (real) vocabulary."""
    from transformers import CLIPTokenizer

    merges = real_clip_merges() if vocab == "clip" else train_bpe(TINY_WORDS, 2000)
    write_clip_tokenizer_files(folder, merges)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token=pad_token)


def clip_text_config(width: int, layers: int, heads: int, act: str, vocab_size: int, proj: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=width * 4 if width >= 256 else 37,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        hidden_act=act,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=proj,
        bos_token_id=0,
        # Real SD checkpoints ship eos_token_id=2, which makes transformers pool at the
        # highest token id; keeping it here keeps the SDXL pooled-embedding path realistic.
        eos_token_id=2,
        pad_token_id=1,
    )


# Each shape: UNet kwargs, VAE kwargs, text encoder(s) (width, layers, heads, activation).
SHAPES = {
    "tiny": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        ),
        # Four blocks: 8x downsampling, as in the real VAE, so latents have the real ratio.
        # The scaling factor brings this random VAE's latents to about unit variance, as 0.18215
        # does for SD's (measured on the DreamBooth photos: raw latent std 0.25).
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, scaling_factor=4.0),
        text=[(32, 5, 4, "quick_gelu")],
        vocab="tiny",
    ),
    "tiny-xl": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=112,  # 6 * 8 + 64
            cross_attention_dim=96,  # 32 + 64
        ),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, scaling_factor=4.0, force_upcast=True),
        # Two widths, as in SDXL (768 + 1280), so the encoders' rows cannot be mixed up.
        text=[(32, 5, 4, "quick_gelu"), (64, 5, 4, "gelu")],
        vocab="tiny",
    ),
    "sd15": dict(
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            sample_size=64,
            attention_head_dim=8,
            cross_attention_dim=768,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        text=[(768, 12, 12, "quick_gelu")],
        vocab="clip",
    ),
    "sdxl": dict(
        unet=dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            transformer_layers_per_block=(1, 2, 10),
            projection_class_embeddings_input_dim=2816,  # 6 * 256 + 1280
            cross_attention_dim=2048,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        text=[(768, 12, 12, "quick_gelu"), (1280, 32, 20, "gelu")],
        vocab="clip",
    ),
}


def build_pipeline(shape: str, folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a random-weight diffusers pipeline folder of the given shape; return its path."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = SHAPES[shape]
    folder = Path(folder)
    torch.manual_seed(seed)
    n_blocks = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        **spec["vae"],
    )
    with torch.no_grad():
        # A trained VAE's posterior is nearly deterministic; a random one's log-variance head
        # would make every latent mostly noise. Pin it to a small, real-looking spread.
        logvar = vae.quant_conv.weight.shape[0] // 2
        vae.quant_conv.weight[logvar:] = 0.0
        vae.quant_conv.bias[logvar:] = -9.0  # std = exp(-4.5), about 0.011
    xl = len(spec["text"]) == 2
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = [make_tokenizer(spec["vocab"], Path(tmp) / "tok")]
        if xl:  # SDXL's second tokenizer pads with "!" rather than the end token.
            tokenizers.append(make_tokenizer(spec["vocab"], Path(tmp) / "tok2", pad_token="!"))
    encoders = []
    for i, (width, layers, heads, act) in enumerate(spec["text"]):
        config = clip_text_config(width, layers, heads, act, len(tokenizers[i]), proj=width)
        encoders.append(CLIPTextModelWithProjection(config) if i == 1 else CLIPTextModel(config))
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder")
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    args = parser.parse_args()
    print(build_pipeline(args.shape, args.folder, args.prediction_type))
