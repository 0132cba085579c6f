"""Random-weight Stable Diffusion pipelines of known shapes, built offline from configs.

Speed and memory depend on tensor shapes, not on weight values, so a random-weight model
of the real shape gives honest timings without downloading anything. The tests use the
`tiny` shapes; the benchmarks use `sd15` and `sdxl` as well.

    python bench/models.py sd15 /tmp/sd15          # writes a diffusers folder
    python bench/models.py tiny /tmp/tiny --prediction_type v_prediction
    python bench/models.py scorers runs/scorers    # CLIP and DINO for `infer.py eval`, offline:
        # infer.py eval RUN --clip_model runs/scorers/clip --dino_model runs/scorers/dino

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
    # The original (A1111/ComfyUI) single-file layout numbers blocks by position, so these keep
    # the real block structure at tiny widths: SD 1.x's four UNet levels (three with cross
    # attention), SDXL's three levels with transformer depth growing per level and a second
    # text encoder deep enough (10 layers) for diffusers to recognise the file as SDXL.
    "tiny-sd1-layout": dict(
        unet=dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            sample_size=32,
            attention_head_dim=2,
            cross_attention_dim=32,
        ),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, scaling_factor=4.0),
        text=[(32, 5, 4, "quick_gelu")],
        vocab="tiny",
    ),
    # SD 2.x: the same UNet levels with linear projections, an OpenCLIP text encoder (gelu).
    "tiny-sd2-layout": dict(
        unet=dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            sample_size=32,
            attention_head_dim=(2, 2, 4, 4),
            use_linear_projection=True,
            cross_attention_dim=32,
        ),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, scaling_factor=4.0),
        text=[(32, 5, 4, "gelu")],
        vocab="tiny",
    ),
    "tiny-xl-layout": dict(
        unet=dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1, 2),
            projection_class_embeddings_input_dim=112,  # 6 * 8 + 64
            cross_attention_dim=96,  # 32 + 64
        ),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, scaling_factor=4.0, force_upcast=True),
        text=[(32, 5, 4, "quick_gelu"), (64, 10, 4, "gelu")],
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


def build_pipeline(
    shape: str,
    folder: str | Path,
    prediction_type: str = "epsilon",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random-weight diffusers pipeline folder of the given shape; return its path.

    `dtype` is the precision the modules are created and stored in (float16 keeps building
    the SDXL shape within a few GB: no float32 copy ever exists)."""
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _build_pipeline(shape, Path(folder), prediction_type, seed)
    finally:
        torch.set_default_dtype(previous_dtype)


def _build_pipeline(shape: str, folder: Path, prediction_type: str, seed: int) -> Path:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = SHAPES[shape]
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


# ----------------------------------------------------------------------------------------
# Scorers for `infer.py eval`: a CLIP and a DINO-shaped ViT with random weights, each a folder
# that transformers loads as the Hub's openai/clip-vit-base-patch32 and facebook/dino-vits16
# (model, image processor, and CLIP's tokenizer). `real` has those models' shapes, `tiny`
# is for tests.

SCORER_SHAPES = {
    "tiny": dict(
        clip_vision=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8
        ),
        clip_text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
        dino=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8),
        image_size=32,
    ),
    "real": dict(  # CLIP ViT-B/32 (the papers' CLIP), DINO ViT-S/16 (DreamBooth's DINO)
        clip_vision=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32
        ),
        clip_text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        projection_dim=512,
        dino=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, patch_size=16),
        image_size=224,
    ),
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_clip_scorer(shape: str, folder: str | Path, seed: int = 0) -> Path:
    """A random-weight CLIPModel folder with its CLIPProcessor (image processor as CLIP's,
    resized and centre-cropped to the shape's size; the `tiny` CLIP vocabulary)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    spec, folder = SCORER_SHAPES[shape], Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer("tiny", Path(tmp) / "tok")
    text = dict(
        spec["clip_text"],
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(
        text_config=text,
        vision_config=dict(spec["clip_vision"], image_size=spec["image_size"]),
        projection_dim=spec["projection_dim"],
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    size = spec["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_dino_scorer(shape: str, folder: str | Path, seed: int = 0) -> Path:
    """A random-weight ViTModel folder shaped as DINO's, with a ViTImageProcessor as DINO's
    (resized to the shape's size, ImageNet mean and spread)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    spec, folder = SCORER_SHAPES[shape], Path(folder)
    size = spec["image_size"]
    torch.manual_seed(seed)
    ViTModel(ViTConfig(**spec["dino"], image_size=size)).save_pretrained(folder)
    processor = ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    processor.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------
# diffusers folder -> original (A1111/ComfyUI, "LDM") single-file layout. Test and bench
# tooling only: the product loads such files through diffusers' own from_single_file.


def _unet_key(key: str, layers: int, has_attention: list[bool]) -> str:
    """A diffusers UNet key in the original layout (input_blocks/middle_block/output_blocks)."""
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1"}
    resnet |= {"norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for old, new in top.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    parts = key.split(".")
    if parts[0] == "mid_block":
        block = {("resnets", "0"): "middle_block.0", ("attentions", "0"): "middle_block.1"}
        block[("resnets", "1")] = "middle_block.2"
        head, rest = block[(parts[1], parts[2])], parts[3:]
    else:
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if parts[0] == "down_blocks":
            if kind == "downsamplers":  # downsamplers.0.conv -> input_blocks.N.0.op
                return f"input_blocks.{(level + 1) * (layers + 1)}.0.op.{rest[-1]}"
            head = f"input_blocks.{1 + level * (layers + 1) + index}.{0 if kind == 'resnets' else 1}"
        else:
            block = level * (layers + 1)
            if kind == "upsamplers":
                return f"output_blocks.{block + layers}.{2 if has_attention[level] else 1}.conv.{rest[-1]}"
            head = f"output_blocks.{block + index}.{0 if kind == 'resnets' else 1}"
    if parts[0] in ("down_blocks", "up_blocks", "mid_block") and ("resnets" in parts):
        rest = [".".join([resnet.get(rest[0], rest[0]), *rest[1:]])]
    return ".".join([head, *rest])


def _vae_key(key: str, levels: int) -> str:
    """A diffusers VAE key in the original layout (down/up/mid with numbered blocks)."""
    replacements = [
        ("conv_norm_out", "norm_out"),
        ("mid_block.resnets.0", "mid.block_1"),
        ("mid_block.resnets.1", "mid.block_2"),
        ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
        ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
        ("mid_block.attentions.0.to_k", "mid.attn_1.k"),
        ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
        ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"),
        ("conv_shortcut", "nin_shortcut"),
    ]
    for old, new in replacements:
        key = key.replace(old, new)
    parts = key.split(".")
    if len(parts) > 3 and parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2])
        if parts[1] == "up_blocks":  # the original decoder counts its levels from the bottom
            level = levels - 1 - level
        side = "down" if parts[1] == "down_blocks" else "up"
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{parts[0]}.{side}.{level}.{side}sample.conv.{parts[-1]}"
        return ".".join([parts[0], side, str(level), "block", *parts[4:]])
    return key


def _open_clip_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder in the OpenCLIP layout (SD 2.x, SDXL's second encoder)."""
    out = {}
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out[prefix + "token_embedding.weight"] = state.pop("embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = state.pop("embeddings.position_embedding.weight")
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layer_names["self_attn.out_proj"] = "attn.out_proj"
    for key in sorted(state):
        if key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = state[key]
            continue
        if not key.startswith("encoder.layers."):
            continue
        _, _, n, *rest = key.split(".")
        name = ".".join(rest)
        block = f"{prefix}transformer.resblocks.{n}."
        if name.startswith("self_attn.q_proj."):  # q, k, v stacked as one in_proj
            kind = name.split(".")[-1]
            qkv = [state[f"encoder.layers.{n}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
        elif not name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            module, param = name.rsplit(".", 1)
            out[block + layer_names[module] + "." + param] = state[key]
    return out


def _read_component(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def original_layout(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a diffusers SD 1.x, 2.x or SDXL folder as an original-layout state dict."""
    folder = Path(folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    layers = unet_config["layers_per_block"]
    has_attention = ["CrossAttn" in t for t in unet_config["up_block_types"]]
    out = {}
    for key, value in _read_component(folder / "unet").items():
        out["model.diffusion_model." + _unet_key(key, layers, has_attention)] = value
    levels = len(vae_config["block_out_channels"])
    for key, value in _read_component(folder / "vae").items():
        # The mid-block attention's linear layers are 1x1 convolutions there.
        out["first_stage_model." + _vae_key(key, levels)] = value[:, :, None, None] if value.ndim == 2 else value
    first = _read_component(folder / "text_encoder")
    if (folder / "text_encoder_2").is_dir():  # SDXL: CLIP ViT-L as transformers lays it out, then OpenCLIP ViT-bigG
        out |= {
            "conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in first.items()
        }
        out |= _open_clip_keys(_read_component(folder / "text_encoder_2"), "conditioner.embedders.1.model.")
    elif json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_act"] == "gelu":
        out |= _open_clip_keys(first, "cond_stage_model.model.")  # SD 2.x: OpenCLIP (OpenAI's CLIP uses quick_gelu)
    else:
        out |= {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in first.items()}
    return out


SAFETENSORS_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """A .safetensors file written one tensor at a time (the tensors stay memory-mapped from
    the folder's files; no second copy of a multi-GB model is assembled in memory)."""
    header, offset = {}, 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
        header[key]["data_offsets"] = [offset, offset + size]
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for tensor in state.values():
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_single_file(folder: str | Path, path: str | Path) -> Path:
    """Write a diffusers folder as one original-layout .safetensors, or .ckpt/.pt (a torch
    pickle with the weights under "state_dict", as the original training code saved them)."""
    path = Path(path)
    state = original_layout(folder)
    if path.suffix == ".safetensors":
        write_safetensors(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "shape",
        choices=[*sorted(SHAPES), "scorers"],
        help="A pipeline's shape, or scorers: FOLDER/clip and FOLDER/dino.",
    )
    parser.add_argument("folder")
    parser.add_argument(
        "--scorer_shape",
        default="tiny",
        choices=sorted(SCORER_SHAPES),
        help="With scorers: tiny, or the real models' shapes.",
    )
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="Precision to build and store.")
    parser.add_argument(
        "--single_file", default=None, help="Also write the weights as one original-layout .safetensors/.ckpt here."
    )
    args = parser.parse_args()
    if args.shape == "scorers":  # random weights: eval runs end to end, its scores mean nothing
        print(build_clip_scorer(args.scorer_shape, Path(args.folder) / "clip"))
        print(build_dino_scorer(args.scorer_shape, Path(args.folder) / "dino"))
        sys.exit(0)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    print(build_pipeline(args.shape, args.folder, args.prediction_type, dtype=dtype))
    if args.single_file:
        print(write_single_file(args.folder, args.single_file))
