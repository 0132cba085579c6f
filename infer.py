#!/usr/bin/env python
"""Generate images with any Textual Inversion embedding, and convert embeddings between tools.

    python infer.py --model BASE --embedding SRC [--embedding SRC2 ...] --prompt "a <cat-toy> backpack"
    python infer.py --model myFinetune.safetensors [--single_file_config DIR_OR_HUB_ID] ...
    python infer.py convert SRC OUT --to diffusers|a1111|kohya

SRC is any of: an output folder of textual_inversion.py (or of the diffusers scripts); a Hub
repo id such as sd-concepts-library/cat-toy (or org/name/file.safetensors for one file of a
repo), downloaded once into the Hugging Face cache; or a single file in any common layout:

    diffusers / sd-concepts-library   {token: [N, D]} (.safetensors or .bin; 1-D [D] also read)
    A1111 .pt                          {"string_to_param": {"*": [N, D]}, "name": ..., ...}
    kohya / OneTrainer / others        one tensor under a generic key (emb_params, emp_params, ...)
    SDXL single file (A1111, ComfyUI,  {"clip_l": [N, 768], "clip_g": [N, 1280]}
      kohya, OneTrainer, invoke)
    diffusers SDXL pair                learned_embeds.safetensors + learned_embeds_2.safetensors

This file is also the one place that writes those layouts: textual_inversion.py saves with the
writers below, `convert` uses the same writers, and the reader below reads them all back, so
what is written and what is read cannot drift apart.

The file reads top to bottom:
    writers                 atomic files; diffusers, SDXL, A1111 and kohya layouts
    read_embedding(src)     any SRC -> Embedding(token, {slot: [N, D]})  (the one reading layer)
    install_embedding(...)  Embedding -> tokenizer(s) and text encoder(s) (the one installer)
    load_embedding(...)     the two together: the API the CLI and the trainer use
    inspect_model_file,     base models as one original-layout file (A1111, ComfyUI): checked from
    load_model_file           key names and shapes, converted by diffusers' single-file loaders
    load_pipeline, generate (enable_clip_skip), write_png, write_grid
    convert_embedding
    main                    the command line

Safety: .pt/.bin/.ckpt files (embeddings and model checkpoints) are pickles, and a pickle can run
code when it is loaded. They are read only with torch.load(weights_only=True), which builds
nothing but tensors and plain containers; a file that needs anything else is refused before any
of it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import textwrap
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save as save_safetensors

logger = logging.getLogger("infer")

_UMASK = os.umask(0)
os.umask(_UMASK)


class EmbeddingError(ValueError):
    """A problem with the user's input (an embedding, a model, a flag), said in one line.

    The CLI prints it without a traceback and exits with status 2; API callers can catch it.
    """


# ----------------------------------------------------------------------------------------
# Writers. Every format is written here and nowhere else; every write is atomic.


class WriteError(EmbeddingError):
    """A file could not be written (a full disk, a read-only folder): one line naming the file
    and the cause. The file's previous version is intact and no temp file is left."""

    def __init__(self, path: str | Path, cause: str):
        super().__init__(f"cannot write {path}: {cause}")
        self.cause = cause


def write_error(path: str | Path, error: OSError) -> WriteError:
    cause = error.strerror or str(error) or type(error).__name__
    return WriteError(path, cause[0].lower() + cause[1:])


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` for a temp file beside `path`, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never half a file; an
    OSError (ENOSPC, EACCES, ...) removes the temp file and becomes a WriteError.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
        tmp = None
        fsync_folder(path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` survive a power cut, not just a crash (POSIX only)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_folder(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp_folder)` for a temp folder beside `path`, then rename it to `path`.

    The folder appears complete or not at all. Write its files with the writers here; a
    WriteError inside names `path`, and the temp folder is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old.tmp")  # the previous version, until the new one is in place
    try:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except WriteError as e:
        raise WriteError(path, e.cause) from None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def append_text(path: str | Path, text: str) -> Path:
    """Append `text` durably (a log: rewriting it each time would grow quadratically). A crash
    can leave a torn last line, which readers drop; a failed append is cut back off."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                data = text.encode("utf-8")
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_torch(path: str | Path, data: object) -> Path:
    """A torch pickle, serialized in memory first so a full disk is a plain OSError (torch.save
    onto a full disk raises a RuntimeError from C++ instead)."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return write_bytes(path, buffer.getvalue())


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # A copy with its own storage: a view would make torch.save write the whole parent
    # tensor and safetensors refuse tensors that share memory.
    return tensor.detach().to("cpu", torch.float32).clone().contiguous()


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Save `{name: tensor}` as safetensors or, for .bin/.pt, as a plain torch pickle of tensors."""
    tensors = {k: _plain(v) for k, v in tensors.items()}
    if str(path).endswith(".safetensors"):
        return write_bytes(path, save_safetensors(tensors, metadata={"format": "pt"}))
    return write_torch(path, tensors)


def write_diffusers_embedding(path: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """diffusers / sd-concepts-library layout: `{token: float32 [N, D]}`."""
    return write_tensors(path, {token: vectors})


def write_sdxl_embedding(path: str | Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """The single-file SDXL layout that A1111, ComfyUI, kohya and invoke-training read."""
    return write_tensors(path, {"clip_l": clip_l, "clip_g": clip_g})


def write_kohya_embedding(path: str | Path, vectors: torch.Tensor) -> Path:
    """kohya sd-scripts' SD 1.x/2.x layout, `{"emb_params": [N, D]}` safetensors. A1111 and ComfyUI
    read it too and, like kohya, call the embedding by its file name."""
    return write_tensors(path, {"emb_params": vectors})


# The id of "*" in the CLIP vocabulary: A1111 files record it, and nothing reads it back.
A1111_STAR_TOKEN_ID = 265


def write_a1111_embedding(path: str | Path, token: str, vectors: torch.Tensor, step: int = 0) -> Path:
    """A1111's classic .pt layout: a pickle of plain dicts, strings, ints and one tensor, so it
    loads with torch.load(weights_only=True) in any tool."""
    data = {
        "string_to_token": {"*": A1111_STAR_TOKEN_ID},
        "string_to_param": {"*": _plain(vectors)},
        "name": token,
        "step": step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    return write_torch(path, data)


def file_name_for_token(token: str) -> str:
    """A file name from a token, safe on every OS: '<cat-toy>' -> 'cat-toy'."""
    name = "".join("_" if c in '<>:"/\\|?*' or ord(c) < 32 else c for c in token).strip("_ .")
    return name or "embedding"


# ----------------------------------------------------------------------------------------
# Reading: any SRC -> one normalized Embedding.
#
# Slots name the text encoder a set of vectors belongs to, as the SDXL single-file layout does:
# "clip_l" is a pipeline's first text encoder (CLIP ViT-L for SD 1.x and SDXL, OpenCLIP ViT-H
# for SD 2.x), "clip_g" its second (SDXL only). A plain SD embedding fills "clip_l".

SLOTS = ("clip_l", "clip_g")
EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Real embeddings are kilobytes to a few megabytes; anything bigger is a model or a LoRA, and
# reading it whole only to refuse it would waste minutes and memory.
MAX_EMBEDDING_BYTES = 64 * 2**20

# Keys of one-tensor files that name the content, not a prompt word (see parse_embedding_data).
GENERIC_KEYS = {
    "emb_params": "kohya",
    "emp_params": "OneTrainer",
    "*": "A1111",
    "embedding": "generic",
    "embeddings": "generic",
    "emb": "generic",
    "vectors": "generic",
    "weight": "generic",
}

FAMILIES = {(768,): "SD 1.x", (1024,): "SD 2.x", (768, 1280): "SDXL", (1280,): "SDXL refiner"}


def family(widths: Iterable[int]) -> str | None:
    """The model family whose text encoders have these widths (None: not a known one)."""
    return FAMILIES.get(tuple(widths))


@dataclass
class Embedding:
    """A Textual Inversion embedding, whatever file it came from."""

    token: str  # the prompt word; multi-vector embeddings add token_1 ... token_{N-1} too
    vectors: dict[str, torch.Tensor]  # slot ("clip_l", "clip_g") -> float32 [N, D]
    source: str  # what the user gave: a path or a Hub id
    layout: str  # "diffusers", "A1111", "kohya", "SDXL", "diffusers SDXL pair", ...
    files: list[Path] = field(default_factory=list)  # the files the vectors were read from
    sha256: list[str] = field(default_factory=list)  # one per file

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.vectors[s].shape[1] for s in SLOTS if s in self.vectors)


def read_embedding(src: str | Path, token: str | None = None) -> Embedding:
    """Read any SRC (folder, file, Hub id) into an Embedding; `token` renames it.

    Nothing is installed anywhere; the result is plain float32 tensors on the CPU.
    """
    source = str(src)
    path = Path(source).expanduser()
    if path.is_dir():
        files = embedding_files_in_folder(path, source)
    elif path.is_file():
        files = with_pair_partner(path)
    elif looks_like_hub_id(source):
        files = files_from_hub(source)
    else:
        raise EmbeddingError(f"{source}: no such file or folder (and not a Hub repo id like org/name)")
    if token is not None and not token.strip():
        raise EmbeddingError(f"{source}: the token to rename it to is empty")

    parsed = [parse_embedding_data(load_tensor_file(f, source), f, source) for f in files]
    if len(parsed) == 2:  # the diffusers SDXL pair: one file per text encoder
        (token_l, vec_l, _), (token_g, vec_g, _) = parsed
        if list(vec_l) != ["clip_l"] or list(vec_g) != ["clip_l"] or token_l != token_g:
            raise EmbeddingError(
                f"{source}: {files[0].name} and {files[1].name} do not form a diffusers SDXL pair "
                f"(expected one vector set each, under the same token; got {token_l!r} and {token_g!r})"
            )
        file_token, layout = token_l, "diffusers SDXL pair"
        vectors = {"clip_l": vec_l["clip_l"], "clip_g": vec_g["clip_l"]}
    else:
        file_token, vectors, layout = parsed[0]

    counts = {v.shape[0] for v in vectors.values()}
    if len(counts) != 1:
        shapes = ", ".join(f"{s} {list(v.shape)}" for s, v in vectors.items())
        raise EmbeddingError(f"{source}: its text encoders have different numbers of vectors ({shapes})")
    return Embedding(
        token=token or file_token or token_from_file_name(files[0]),
        vectors=vectors,
        source=source,
        layout=layout,
        files=files,
        sha256=[sha256_of(f) for f in files],
    )


def embedding_files_in_folder(folder: Path, source: str) -> list[Path]:
    """The file(s) to read in a folder: learned_embeds(.safetensors|.bin) (with its _2 partner
    for SDXL) when present, else the folder's only embedding-like file."""
    for suffix in (".safetensors", ".bin"):
        main = folder / f"learned_embeds{suffix}"
        if main.is_file():
            return with_pair_partner(main)
    candidates = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix in EMBEDDING_SUFFIXES and not p.name.startswith(".") and "-steps-" not in p.name
    )
    if len(candidates) == 1:
        return with_pair_partner(candidates[0])
    if not candidates:
        raise EmbeddingError(
            f"{source}: no embedding file in this folder (looked for learned_embeds.safetensors/.bin, "
            f"or any one {'/'.join(EMBEDDING_SUFFIXES)} file)"
        )
    names = ", ".join(p.name for p in candidates[:6]) + (", ..." if len(candidates) > 6 else "")
    raise EmbeddingError(f"{source}: this folder holds {len(candidates)} embedding files ({names}); give one of them")


_PAIR_NAME = re.compile(r"^learned_embeds(_2)?(-steps-\d+)?(\.\w+)$")


def with_pair_partner(path: Path) -> list[Path]:
    """[path], or [first, second] when it is half of a diffusers SDXL pair
    (learned_embeds[-steps-N].ext + learned_embeds_2[-steps-N].ext side by side)."""
    match = _PAIR_NAME.match(path.name)
    if not match:
        return [path]
    first = path.with_name(f"learned_embeds{match[2] or ''}{match[3]}")
    second = path.with_name(f"learned_embeds_2{match[2] or ''}{match[3]}")
    if first.is_file() and second.is_file():
        return [first, second]
    return [path]


def looks_like_hub_id(source: str) -> bool:
    """org/name, or org/name/path/to/file, as the Hub spells repo ids."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[^\s]+)?", source) is not None and ".." not in source


def files_from_hub(source: str) -> list[Path]:
    """Download (or find in the Hugging Face cache) the embedding file(s) of a Hub repo.

    Only small top-level embedding files are fetched, never a model's weights: a repo id given
    by mistake for a whole model must not start a multi-gigabyte download.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    parts = source.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        if filename:
            return with_pair_partner(Path(hf_hub_download(repo_id, filename)))
        try:
            entries = [e for e in HfApi().list_repo_tree(repo_id) if isinstance(e, RepoFile)]
        except Exception:
            # Then the cached snapshot (whatever was fetched before) is all there is; its
            # error, if there is none, says why (offline mode, no connection, no such repo).
            folder = Path(snapshot_download(repo_id))
        else:
            names = [e.path for e in entries if e.path.startswith("learned_embeds")]
            if not names:
                names = [
                    e.path for e in entries if e.path.endswith(EMBEDDING_SUFFIXES) and e.size <= MAX_EMBEDDING_BYTES
                ]
            if not names:
                listed = ", ".join(e.path for e in entries[:8])
                raise EmbeddingError(f"{source}: no embedding file on the Hub repo (it holds: {listed or 'nothing'})")
            allow = [*names, "token_identifier.txt"]
            folder = Path(snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=["*/*"]))
    except EmbeddingError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmbeddingError(
            f"{source}: not a local file or folder, and the Hugging Face Hub could not provide it ({reason})"
        ) from None
    return embedding_files_in_folder(folder, source)


def load_tensor_file(path: Path, source: str) -> object:
    """The contents of a safetensors file or, safely, of a torch pickle (.pt/.bin/.ckpt)."""
    size = path.stat().st_size
    if size > MAX_EMBEDDING_BYTES:
        raise EmbeddingError(
            f"{source}: {path.name} is {size / 2**20:.0f} MB, far bigger than an embedding "
            "(kilobytes); is it a model checkpoint or a LoRA?"
        )
    with open(path, "rb") as f:
        head = f.read(9)
    # Decide by content, not by name: files are often renamed. safetensors starts with an
    # 8-byte header length followed by the JSON header.
    if len(head) == 9 and head[8:9] == b"{":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise EmbeddingError(f"{source}: {path.name} is not a readable safetensors file ({e})") from None
    return load_pickle(path, source)


def load_pickle(path: Path, source: str, mmap: bool = False) -> object:
    """A torch pickle (.pt/.bin/.ckpt) read with the tensors-only unpickler; `mmap` maps the
    tensors' bytes from the file instead of reading them (zip-format files only)."""
    try:
        # ParameterDict appears in embeddings of the original (2022) textual_inversion code;
        # allowing that one torch class lets them load without allowing arbitrary objects.
        with torch.serialization.safe_globals([torch.nn.ParameterDict]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says it all
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:
        message = str(e)
        refused = f"{source}: refused {path.name}: it is a pickle that"
        advice = "nothing in it was run. Ask its author for a .safetensors version"
        needed = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if needed:
            raise EmbeddingError(
                f"{refused} needs the Python object {needed[1]} to load, not just tensors, so it could run "
                f"code; {advice}"
            ) from None
        unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
        if unpickler:
            raise EmbeddingError(f"{refused} the tensors-only loader cannot read ({unpickler[1]}); {advice}") from None
        reason = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        raise EmbeddingError(
            f"{source}: {path.name} is neither safetensors nor a readable PyTorch file; is it truncated or "
            f"corrupt? ({reason})"
        ) from None


def parse_embedding_data(data: object, path: Path, source: str) -> tuple[str | None, dict[str, torch.Tensor], str]:
    """(token or None, {slot: [N, D]}, layout name) from a loaded file's contents.

    The layouts, tried in this order:
      - "string_to_param" (A1111, and the original textual_inversion code): the token is the
        file's "name" field, as diffusers reads it. (A1111 itself calls an embedding by its file
        name; for files A1111 wrote the two agree, and --token settles any difference.)
      - "clip_l" and/or "clip_g": the SDXL single file (A1111, ComfyUI, kohya, OneTrainer,
        invoke-training). No token inside.
      - exactly one tensor: its key is the token (diffusers, sd-concepts-library), unless the
        key is a generic name that describes the content (GENERIC_KEYS: kohya's emb_params,
        OneTrainer's emp_params, "embedding", "weight", ...), in which case there is no token.
      - a bare tensor: no token.
    A file without a token is called by --token, else by the token in a token_identifier.txt
    written beside it, else by its file name (as A1111, ComfyUI and kohya call embeddings).
    """
    if isinstance(data, torch.Tensor):  # a bare tensor saved with torch.save
        return None, {"clip_l": as_rows(data, path, source)}, "bare tensor"
    if not isinstance(data, dict):
        raise EmbeddingError(f"{source}: {path.name} holds a {type(data).__name__}, not an embedding")

    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        try:
            params = {"*": params} if isinstance(params, torch.Tensor) else dict(params)
        except (TypeError, ValueError):
            raise EmbeddingError(f"{source}: {path.name} has a string_to_param that is not a set of vectors") from None
        if len(params) != 1:
            raise EmbeddingError(f"{source}: A1111 file {path.name} has {len(params)} vector sets; expected one")
        name = data.get("name")
        token = name if isinstance(name, str) and name.strip() else None
        return token, {"clip_l": as_rows(next(iter(params.values())), path, source)}, "A1111"

    if "clip_l" in data or "clip_g" in data:  # SDXL single file (or a clip_l-only one)
        vectors = {s: as_rows(data[s], path, source) for s in SLOTS if s in data}
        return None, vectors, "SDXL" if len(vectors) == 2 else f"{next(iter(vectors))} only"

    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        key, value = next(iter(tensors.items()))
        if key in GENERIC_KEYS:
            return None, {"clip_l": as_rows(value, path, source)}, GENERIC_KEYS[key]
        return key, {"clip_l": as_rows(value, path, source)}, "diffusers"

    keys = list(data)
    shown = ", ".join(map(str, keys[:5])) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "")
    hint = "; it looks like a LoRA or a model, not an embedding" if len(keys) > 5 else ""
    raise EmbeddingError(f"{source}: {path.name} is not an embedding layout this reads (keys: {shown}){hint}")


def as_rows(value: object, path: Path, source: str) -> torch.Tensor:
    """float32 [N, D] from the shapes tools write: [D] (one vector), [N, D], or [1, N, D]."""
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{source}: {path.name} holds a {type(value).__name__} where a tensor should be")
    rows = value.detach().to("cpu", torch.float32)
    if rows.ndim == 1:
        rows = rows.unsqueeze(0)
    elif rows.ndim == 3 and rows.shape[0] == 1:
        rows = rows[0]
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise EmbeddingError(f"{source}: {path.name} holds a tensor of shape {list(value.shape)}, not [vectors, width]")
    if not torch.isfinite(rows).all():
        raise EmbeddingError(f"{source}: {path.name} contains NaN or infinite values (did its training diverge?)")
    return rows.clone()


def token_from_file_name(path: Path) -> str:
    """The token of a file that carries none: the one in token_identifier.txt beside it when
    that file was written with it (our SDXL <name>.safetensors, diffusers folders), else the
    file name, as A1111 and ComfyUI call embeddings."""
    identifier = path.with_name("token_identifier.txt")
    if identifier.is_file():
        written = identifier.read_text(encoding="utf-8").strip()
        if written and (path.name.startswith("learned_embeds") or file_name_for_token(written) == path.stem):
            return written
    return path.stem


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# Installing: one Embedding -> the pipeline's tokenizer(s) and text encoder(s).


def text_encoder_slots(pipe) -> list[tuple[str, object, torch.nn.Module]]:
    """[(slot, tokenizer, text encoder)] for each text encoder the pipeline has."""
    found = []
    for slot, tokenizer_name, encoder_name in (
        ("clip_l", "tokenizer", "text_encoder"),
        ("clip_g", "tokenizer_2", "text_encoder_2"),
    ):
        tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
        if tokenizer is not None and encoder is not None:
            found.append((slot, tokenizer, encoder))
    return found


def fit_to_base(emb: Embedding, base: dict[str, int]) -> dict[str, torch.Tensor]:
    """The vectors to load into each of the base's slots, or an error naming both widths and
    the model families they belong to.

    An SDXL embedding on a one-encoder base whose width matches its clip_l part loads that part
    alone, with a warning: it is what people moving SDXL concepts to SD 1.x want, but the
    concept was trained with both encoders and may come out weaker.
    """
    have, want = emb.widths, tuple(base.values())
    if list(emb.vectors) == list(base):
        if have == want:
            return dict(emb.vectors)
        problem = ""
    elif list(base) == ["clip_l"] and "clip_l" in emb.vectors:
        if emb.vectors["clip_l"].shape[1] == want[0]:
            logger.warning(
                "%s is an SDXL embedding (clip_l + clip_g); loading its clip_l vectors only into this "
                "one-encoder model",
                emb.source,
            )
            return {"clip_l": emb.vectors["clip_l"]}
        problem = ", which not even its clip_l part fits"
    elif list(base) == list(SLOTS):
        problem = ", and an SDXL-shaped model needs vectors for both of its text encoders (clip_l and clip_g)"
    else:
        problem = f"; it has {' and '.join(emb.vectors)} vectors, the base model needs {' and '.join(base)}"
    encoders = "text encoders take" if len(want) > 1 else "text encoder takes"
    options = [f"load it on an {family(have)} model"] if family(have) else []
    options.append(f"use an embedding made for {family(want) or 'this base model'}")
    raise EmbeddingError(
        f"{emb.source}: its vectors are {_width_text(have)}, but the base model's {encoders} "
        f"{'+'.join(map(str, want))}{f' ({family(want)})' if family(want) else ''}{problem}; {', or '.join(options)}"
    )


def _width_text(widths: tuple[int, ...]) -> str:
    text = "+".join(map(str, widths)) + " wide"
    return f"{text}, made for {family(widths)}" if family(widths) else text


def prompt_form(token: str, tokenizer) -> str:
    """The token as the tokenizer sees prompt text. CLIP lowercases prompts, and diffusers'
    multi-vector expansion only finds tokens stored in that form, so a capitalised
    multi-vector token (A1111's EasyNegative) would silently use its first vector alone."""
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    return normalizer.normalize_str(token) if normalizer is not None else token


def install_embedding(pipe, emb: Embedding) -> list[str]:
    """Add the embedding's tokens to every tokenizer and its vectors to every text encoder of
    `pipe`, as diffusers' load_textual_inversion does (it does the writing); return the tokens
    added: [token, token_1, ..., token_{N-1}], the first being the one to write in prompts."""
    slots = text_encoder_slots(pipe)
    if not slots or not hasattr(pipe, "load_textual_inversion"):
        raise EmbeddingError(f"{emb.source}: {type(pipe).__name__} has no CLIP text encoder to load an embedding into")
    vectors = fit_to_base(emb, {slot: enc.get_input_embeddings().weight.shape[1] for slot, _, enc in slots})
    token = prompt_form(emb.token.strip(), slots[0][1])
    tokens = [token] + [f"{token}_{i}" for i in range(1, emb.num_vectors)]

    for _, tokenizer, _ in slots:
        vocab = tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken:
            earlier = " (an embedding loaded earlier has it)" if taken[0] in tokenizer.added_tokens_encoder else ""
            raise EmbeddingError(
                f"{emb.source}: token {taken[0]!r} already exists in the base model's vocabulary{earlier}; "
                f"load this embedding under another name with --token (token= in Python), "
                f"e.g. --token '<{file_name_for_token(token)}-2>'"
            )
    if len(slots[0][1].encode(token, add_special_tokens=False)) == 1:
        logger.warning(
            "token %r is also a word the model knows; in prompts it now means this embedding "
            "(load it with --token to keep both)",
            token,
        )

    from transformers.utils import logging as transformers_logging

    # Resizing the embedding table logs how new rows are initialised; they are overwritten at once.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        for slot, tokenizer, encoder in slots:
            pipe.load_textual_inversion(vectors[slot], token=token, tokenizer=tokenizer, text_encoder=encoder)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return tokens


def load_embedding(pipe, src: str | Path | Embedding, token: str | None = None) -> list[str]:
    """Load any embedding (folder, file, Hub id, or an Embedding already read) into `pipe`.

    Returns the tokens it added, [token, token_1, ..., token_{N-1}]; write the first one in
    prompts and the pipeline expands it to all N. `token` renames the embedding. Raises
    EmbeddingError, with a one-line message, for anything the user has to fix.
    """
    if isinstance(src, Embedding):
        emb = replace(src, token=token) if token else src
    else:
        emb = read_embedding(src, token)
    return install_embedding(pipe, emb)


# ----------------------------------------------------------------------------------------
# Prompts.


def _added_tokens(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if not t.special]


def normalize_prompt(pipe, prompt: str | None) -> str | None:
    """Write each loaded token in the prompt the way it is stored (lower case for CLIP), so that
    diffusers expands multi-vector tokens however the user capitalised them."""
    if not prompt:
        return prompt
    slots = text_encoder_slots(pipe)
    if not slots:
        return prompt
    tokenizer = slots[0][1]
    if prompt_form("A", tokenizer) != "a":  # this tokenizer keeps case: nothing to match
        return prompt
    for token in sorted(_added_tokens(tokenizer), key=len, reverse=True):
        prompt = re.sub(re.escape(token), lambda _m, t=token: t, prompt, flags=re.IGNORECASE)
    return prompt


def unused_tokens(pipe, tokens: Iterable[str], *prompts: str | None) -> list[str]:
    """The tokens that none of the prompts uses: loaded embeddings that will do nothing."""
    slots = text_encoder_slots(pipe)
    tokenizer = slots[0][1]
    seen = set()
    for prompt in prompts:
        if prompt:
            seen.update(tokenizer.tokenize(normalize_prompt(pipe, prompt)))
    return [t for t in tokens if t not in seen]


# ----------------------------------------------------------------------------------------
# Pipelines and generation.

SCHEDULERS = {
    # name: (diffusers class, extra config), built from the pipeline's own scheduler config so
    # the model's training schedule (betas, prediction type) carries over.
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "default": None,  # the model's own scheduler
}


def pick_device(name: str = "auto") -> torch.device:
    """auto: cuda, then mps (Apple), then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EmbeddingError(f"--device {name}: not a device name (auto, cuda, cuda:1, mps, cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EmbeddingError(f"--device {name}: CUDA is not available here; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EmbeddingError(f"--device {name}: MPS is not available here; use --device auto or cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float16 on CUDA (half the memory, same images to the eye), float32 elsewhere
    (CPU float16 is slow, and float16 on MPS can produce black images with some models)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------------------
# Base models in one original-layout file (A1111, ComfyUI, CivitAI): checked from key names
# and shapes alone, then loaded by diffusers' own single-file converters. The trainer loads
# its models through the same functions.

MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# diffusers' names (from infer_diffusers_model_type) of the architectures handled here.
MODEL_KINDS = {"v1": "SD 1.x", "v2": "SD 2.x", "xl_base": "SDXL"}
UNET_PREFIX = "model.diffusion_model."
# Where each component's weights live in the original layout.
COMPONENT_PREFIXES = {
    "unet": (UNET_PREFIX,),
    "vae": ("first_stage_model.",),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
    "text_encoder_2": ("conditioner.embedders.1.",),
}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class ModelFile:
    """An original-layout checkpoint that passed the checks, and the diffusers folder whose
    configs, tokenizer(s) and scheduler describe it."""

    path: Path
    source: str  # how errors name it: the flag and the path
    kind: str  # a key of MODEL_KINDS
    config: str  # a local diffusers folder (or a configs-only snapshot of a Hub repo)
    dtype: torch.dtype  # the precision the UNet is stored in

    @property
    def components(self) -> tuple[str, ...]:
        """The components whose weights the file holds."""
        return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if self.kind == "xl_base" else ())


def is_model_file(name: str | Path) -> bool:
    """A file (or a path to a file not there yet) rather than a folder or a Hub id."""
    path = Path(name).expanduser()
    return path.is_file() or (not path.exists() and str(name).endswith(MODEL_FILE_SUFFIXES))


def tensor_headers(path: Path, source: str) -> dict[str, object]:
    """A checkpoint's entries with every tensor as a meta tensor (name, shape, dtype, no data):
    from the safetensors header, or from a pickle mapped into memory, never reading the weights."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":
            length = int.from_bytes(head[:8], "little")
            f.seek(8)
            try:
                header = json.loads(f.read(length)) if 8 + length <= size else None
            except ValueError:
                header = None
            if not isinstance(header, dict):
                raise EmbeddingError(
                    f"{source}: its safetensors header is unreadable; the file is truncated or corrupt"
                )
            header.pop("__metadata__", None)
            end = 8 + length + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
            if end > size:
                raise EmbeddingError(
                    f"{source}: the file is truncated ({size:,} bytes of the {end:,} its header lists); "
                    "download it again"
                )
            return {
                key: torch.empty(v["shape"], dtype=SAFETENSORS_DTYPES.get(v["dtype"], torch.uint8), device="meta")
                for key, v in header.items()
            }
    data = state_dict_of(load_pickle(path, source, mmap=True), source)
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in data.items()}


def state_dict_of(data: object, source: str) -> dict:
    """The weights of a loaded pickle: training code saved them under "state_dict", sometimes nested."""
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise EmbeddingError(f"{source}: it holds a {type(data).__name__}, not a model's weights")
    return data


def model_kind(entries: dict[str, object], source: str) -> str:
    """What the file is, from its key names and shapes: a key of MODEL_KINDS, or a one-line
    error naming what it is instead."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    keys = list(entries)
    if any(m in k for k in keys for m in ("hada_w1", "lokr_w1", "lokr_w2", ".oft_", "oft_blocks")):
        raise EmbeddingError(
            f"{source}: is a LyCORIS (LoHa/LoKr/OFT) file, not a base model; give the checkpoint it was made for"
        )
    if any(m in k for k in keys for m in ("lora_up.", "lora_down.", "lora_A.", "lora_B.", ".lora.")):
        raise EmbeddingError(f"{source}: is a LoRA, not a base model; give the checkpoint it was made for")
    tensors = [v for v in entries.values() if isinstance(v, torch.Tensor)]
    # Embeddings are a few [N, D] tensors under a token or layout name; models' keys are dotted paths.
    few_vectors = 0 < len(keys) <= 4 and len(tensors) == len(keys) and all(t.ndim <= 2 for t in tensors)
    named_like_embedding = "string_to_param" in entries or set(keys) & {"clip_l", "clip_g", *GENERIC_KEYS}
    if named_like_embedding or (few_vectors and not any("." in k for k in keys)):
        raise EmbeddingError(
            f"{source}: is a Textual Inversion embedding, not a base model; give the checkpoint it was trained "
            "for (generate with an embedding through infer.py --embedding)"
        )
    try:
        kind = infer_diffusers_model_type(entries)
    except Exception:  # its rules read tensors' values for a few exotic models: not ours either way
        kind = "unknown"
    if "inpaint" in kind:
        raise EmbeddingError(
            f"{source}: is an inpainting model (its UNet takes 9 input channels, not 4); give the text-to-image "
            "model it was made from"
        )
    if kind not in MODEL_KINDS:
        raise EmbeddingError(
            f"{source}: is a {kind} checkpoint (as diffusers names it), an architecture this does not handle; "
            "give a Stable Diffusion 1.x, 2.x or SDXL text-to-image model"
        )
    if UNET_PREFIX + "input_blocks.0.0.weight" not in entries:
        if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.")) for k in keys):
            raise EmbeddingError(
                f"{source}: is a VAE alone, not a base model; give it as --pretrained_vae_model_name_or_path"
            )
        raise EmbeddingError(
            f"{source}: is not a Stable Diffusion checkpoint (no {UNET_PREFIX}input_blocks UNet weights)"
        )
    for part, prefixes in (("VAE", COMPONENT_PREFIXES["vae"]), ("text encoder", COMPONENT_PREFIXES["text_encoder"])):
        if not any(k.startswith(prefixes) for k in keys):
            raise EmbeddingError(f"{source}: holds no {part} weights, only part of a model; give a full checkpoint")
    return kind


def model_file_config(entries: dict[str, object], source: str, config: str | None) -> str:
    """A local folder with the configs and tokenizer(s) describing the file: `config` itself, or
    the configs-only part of a Hub repo (`config`, or diffusers' default repo for the file's kind)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download

    if config is not None and Path(config).expanduser().is_dir():
        return str(Path(config).expanduser())
    repo = config or fetch_diffusers_config(entries)["pretrained_model_name_or_path"]
    try:
        return snapshot_download(repo, allow_patterns=["*.json", "*.txt"])
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        given = f"--single_file_config {config}" if config else f"its configs come from {repo}, which"
        raise EmbeddingError(
            f"{source}: {given} is not a local folder and the Hub could not provide it ({reason}); pass "
            "--single_file_config with a local diffusers folder of the same architecture"
        ) from None


def check_config_matches(entries: dict[str, object], kind: str, config: str, source: str, config_name: str) -> None:
    """The config folder describes the file: the same family and the same key shapes."""

    def read(sub: str) -> dict:
        path = Path(config) / sub / "config.json"
        if not path.is_file():
            raise EmbeddingError(f"--single_file_config {config_name}: no {sub}/config.json; give a diffusers folder")
        return json.loads(path.read_text())

    is_xl = (Path(config) / "text_encoder_2").is_dir()
    if is_xl != (kind == "xl_base"):
        raise EmbeddingError(
            f"--single_file_config {config_name} describes {'an SDXL' if is_xl else 'a SD 1.x/2.x'} pipeline but "
            f"{source} is {MODEL_KINDS[kind]}; give the config of the model the file was made from"
        )
    unet, vae = read("unet"), read("vae")
    input_blocks = {int(k.split(".")[3]) for k in entries if k.startswith(UNET_PREFIX + "input_blocks.")}
    cross = next(v for k, v in entries.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    compared = [
        ("UNet input blocks", len(input_blocks), len(unet["block_out_channels"]) * (unet["layers_per_block"] + 1)),
        ("UNet width", entries[UNET_PREFIX + "input_blocks.0.0.weight"].shape[0], unet["block_out_channels"][0]),
        ("UNet cross-attention width", cross.shape[1], unet["cross_attention_dim"]),
        ("VAE width", entries["first_stage_model.encoder.conv_in.weight"].shape[0], vae["block_out_channels"][0]),
    ]
    embeddings = {
        "text_encoder": [
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "cond_stage_model.model.token_embedding.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        ],
        "text_encoder_2": ["conditioner.embedders.1.model.token_embedding.weight"],
    }
    for sub, names in embeddings.items():
        found = [entries[n].shape for n in names if n in entries]
        if sub == "text_encoder" or is_xl:
            text = read(sub)
            shape = tuple(found[0]) if found else None
            compared.append((f"{sub} [vocabulary, width]", shape, (text["vocab_size"], text["hidden_size"])))
    for what, in_file, in_config in compared:
        if in_file != in_config:
            raise EmbeddingError(
                f"--single_file_config {config_name} does not match {source}: {what} is {in_file} in the file "
                f"but {in_config} in the config; give the config of the model the file was made from"
            )


def inspect_model_file(name: str | Path, config: str | None, flag: str) -> ModelFile:
    """Check an original-layout model file cheaply (key names and shapes, no weights read) and
    find the configs describing it; every problem is a one-line EmbeddingError naming the file."""
    path = Path(name).expanduser()
    source = f"{flag} {name}"
    if not path.is_file():
        raise EmbeddingError(f"{source}: no such file")
    entries = tensor_headers(path, source)
    kind = model_kind(entries, source)
    folder = model_file_config(entries, source, config)
    check_config_matches(entries, kind, folder, source, config or folder)
    return ModelFile(path, source, kind, folder, entries[UNET_PREFIX + "input_blocks.0.0.weight"].dtype)


def read_tensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    """All the weights of a checkpoint, mapped from the file rather than copied where the
    format allows (safetensors; zip-format pickles), read with the tensors-only unpickler."""
    with open(path, "rb") as f:
        is_safetensors = f.read(9)[8:9] == b"{"
    if is_safetensors:
        from safetensors.torch import load_file

        return load_file(str(path))
    return state_dict_of(load_pickle(path, source, mmap=True), source)


def load_model_file(model: ModelFile, dtypes: dict[str, torch.dtype]) -> dict[str, torch.nn.Module]:
    """The components named in `dtypes` (unet, vae, text_encoder, text_encoder_2), each at its
    precision, converted by diffusers' single-file loaders with the configs of `model.config`.

    A component's original tensors are dropped as soon as it is built, so the file's weights
    and the built modules do not both stay alive in full."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    state = read_tensors(model.path, model.source)
    modules = {}
    for name, dtype in dtypes.items():
        try:
            if name in ("unet", "vae"):
                cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
                modules[name] = cls.from_single_file(
                    state, config=model.config, subfolder=name, torch_dtype=dtype, local_files_only=True
                )
            else:
                cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
                modules[name] = create_diffusers_clip_model_from_ldm(
                    cls, state, subfolder=name, config=model.config, torch_dtype=dtype, local_files_only=True
                )
        except (OSError, ValueError, RuntimeError) as e:  # e.g. shapes the checks did not compare
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EmbeddingError(f"{model.source}: cannot load its {name} ({reason})") from None
        for key in [k for k in state if k.startswith(COMPONENT_PREFIXES[name])]:
            del state[key]
    return modules


def load_vae(source: str, config: str, dtype: torch.dtype, flag: str):
    """An AutoencoderKL from a diffusers VAE folder or Hub id, or from one VAE file in the
    original layout (its config: `config`'s vae/, the base model's)."""
    from diffusers import AutoencoderKL

    label = f"{flag} {source}"
    try:
        if is_model_file(source):
            path = Path(source).expanduser()
            if not path.is_file():
                raise EmbeddingError(f"{label}: no such file")
            keys = list(tensor_headers(path, label))
            if not any(k.endswith("encoder.conv_in.weight") for k in keys):
                raise EmbeddingError(f"{label}: not a VAE (no encoder.conv_in weights)")
            state = read_tensors(path, label)
            return AutoencoderKL.from_single_file(
                state, config=config, subfolder="vae", torch_dtype=dtype, local_files_only=True
            )
        subfolder = "vae" if (Path(source).expanduser() / "vae").is_dir() else None
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)
    except EmbeddingError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # missing files, shapes that do not fit the config
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmbeddingError(f"{label}: cannot load it as this model's VAE ({reason})") from None


def load_pipeline(
    model: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    single_file_config: str | None = None,
    prediction_type: str | None = None,
):
    """A text-to-image pipeline on `device` from a local diffusers folder, a Hub id or an
    original-layout model file (described by `single_file_config`, see inspect_model_file);
    `prediction_type` overrides the scheduler's."""
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    path = Path(model).expanduser()
    root, modules = str(path) if path.is_dir() else model, {}
    if is_model_file(model):
        model_file = inspect_model_file(model, single_file_config, "--model")
        root, modules = model_file.config, load_model_file(model_file, dict.fromkeys(model_file.components, dtype))
    try:
        config = DiffusionPipeline.load_config(root)
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in config else {}
        pipe = AutoPipelineForText2Image.from_pretrained(root, dtype=dtype, **modules, **extra)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmbeddingError(
            f"--model {model}: cannot load it as a diffusers text-to-image pipeline ({reason})"
        ) from None
    if prediction_type is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            own_weight_memory(component)
    return pipe


def own_weight_memory(module: torch.nn.Module) -> None:
    """On the CPU, give each weight its own allocation. Weights mapped from a file sit at that
    file's byte offsets, and CPU kernels take alignment-dependent paths, so the same weights
    from a single file and from a diffusers folder would differ in the last bit. (Moving to a
    GPU copies them already.)"""
    for parameter in module.parameters():
        if parameter.device.type == "cpu":
            parameter.data = parameter.data.clone()


def set_scheduler(pipe, name: str) -> None:
    import diffusers

    entry = SCHEDULERS[name]
    if entry is not None:
        cls, extra = entry
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)


def default_guidance_scale(pipe) -> float:
    import inspect

    return inspect.signature(pipe.__call__).parameters["guidance_scale"].default


def generate(
    pipe,
    prompt: str,
    *,
    seeds: Iterable[int],
    negative_prompt: str | None = None,
    steps: int = 30,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    clip_skip: int = 0,
    on_step: Callable[[], None] | None = None,
) -> list:
    """One image per seed, each from its own generator, so image k can be made again alone.

    The generators live on the CPU: the same seed gives the same starting noise on any device.
    `clip_skip` is diffusers' (1: the penultimate CLIP layer); use the one the embedding was
    trained with.
    """
    prompt, negative_prompt = normalize_prompt(pipe, prompt), normalize_prompt(pipe, negative_prompt)
    options = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    if clip_skip:
        enable_clip_skip(pipe)

    def step_done(_pipe, _step, _timestep, callback_kwargs):
        if on_step is not None:
            on_step()
        return callback_kwargs

    images = []
    for seed in seeds:
        result = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=torch.Generator("cpu").manual_seed(seed),
            clip_skip=clip_skip or None,
            callback_on_step_end=step_done,
            **options,
        )
        images.append(result.images[0])
    return images


def enable_clip_skip(pipe) -> None:
    """Let `pipe(..., clip_skip=N)` run on SD 1.x/2.x pipelines with transformers >= 5.6.

    diffusers reads text_encoder.text_model.final_layer_norm there, and those versions moved
    the layer onto CLIPTextModel itself (diffusers issue #14124). The old name is pointed at
    the same layer without registering a submodule, so weights and state_dict are unchanged.
    """
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is not None and not hasattr(encoder, "text_model") and hasattr(encoder, "final_layer_norm"):
        object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))


def write_png(path: str | Path, image, parameters: dict) -> Path:
    """A PNG with `parameters` as JSON in its "parameters" tEXt chunk (ASCII-escaped JSON, so
    it is always tEXt, and PNG Info viewers show it)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def write_grid(path: str | Path, images: list, parameters: dict) -> Path:
    """The images tiled in a near-square grid, in seed order."""
    from PIL import Image

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * w, (k // columns) * h))
    return write_png(path, grid, parameters)


def next_image_number(folder: Path) -> int:
    """Images are numbered on from the highest number already in `folder`, never overwritten."""
    numbers = [int(m[1]) for p in folder.glob("*.png") if (m := re.match(r"(\d{5,})-", p.name))]
    return max(numbers, default=-1) + 1


# ----------------------------------------------------------------------------------------
# Conversion.

CONVERT_FORMATS = ("diffusers", "a1111", "kohya")


def convert_embedding(src: str | Path | Embedding, out: str | Path, to: str, token: str | None = None) -> list[Path]:
    """Write the embedding in the layout another tool reads; return the files written.

    OUT is a file, or a folder (an existing one, or a path without an extension) that receives
    the file under its usual name:
      diffusers  SD: {token: [N, D]} .safetensors or .bin (folder: learned_embeds.safetensors)
                 SDXL: folder with learned_embeds.safetensors + learned_embeds_2.safetensors
      a1111      SD: A1111 .pt; SDXL: clip_l/clip_g .safetensors (file named after the token)
      kohya      SD: {"emb_params": [N, D]} .safetensors; SDXL: clip_l/clip_g .safetensors
    A1111, ComfyUI and kohya call an embedding by its file name, so folder outputs are named
    after the token ('<cat-toy>' -> cat-toy.pt).
    """
    if to not in CONVERT_FORMATS:
        raise EmbeddingError(f"--to {to}: choose one of {', '.join(CONVERT_FORMATS)}")
    emb = src if isinstance(src, Embedding) else read_embedding(src, token)
    if token and emb.token != token:
        emb = replace(emb, token=token)
    if list(emb.vectors) == ["clip_g"]:
        raise EmbeddingError(f"{emb.source}: it has clip_g vectors only; no tool reads that alone")
    sdxl = "clip_g" in emb.vectors
    out = Path(out).expanduser()
    folder = out if out.is_dir() or not out.suffix else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    elif not out.parent.is_dir():
        raise EmbeddingError(f"{out}: its folder {out.parent} does not exist")
    clip_l = emb.vectors["clip_l"]

    def target(suffixes: tuple[str, ...], name: str) -> Path:
        if folder is not None:
            return folder / f"{name}{suffixes[0]}"
        if out.suffix not in suffixes:
            raise EmbeddingError(f"{out}: --to {to} writes {' or '.join(suffixes)} files here; name it so")
        return out

    if to == "diffusers" and sdxl:
        if folder is None:
            raise EmbeddingError(f"{out}: the diffusers SDXL layout is two files; give a folder")
        return [
            write_diffusers_embedding(folder / "learned_embeds.safetensors", emb.token, clip_l),
            write_diffusers_embedding(folder / "learned_embeds_2.safetensors", emb.token, emb.vectors["clip_g"]),
            write_text(folder / "token_identifier.txt", emb.token),
        ]
    if to == "diffusers":
        written = [write_diffusers_embedding(target((".safetensors", ".bin"), "learned_embeds"), emb.token, clip_l)]
        if folder is not None:
            written.append(write_text(folder / "token_identifier.txt", emb.token))
        return written
    name = file_name_for_token(emb.token)
    if sdxl:
        return [write_sdxl_embedding(target((".safetensors",), name), clip_l, emb.vectors["clip_g"])]
    if to == "a1111":
        return [write_a1111_embedding(target((".pt",), name), emb.token, clip_l)]
    return [write_kohya_embedding(target((".safetensors",), name), clip_l)]


# ----------------------------------------------------------------------------------------
# Command line.


def build_generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py",
        description="Generate images with Textual Inversion embeddings from any tool. "
        "(Also: 'infer.py convert SRC OUT --to diffusers|a1111|kohya'.)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="Base model (SD 1.x, 2.x or SDXL): a diffusers folder, a Hub id, or one .safetensors/.ckpt file "
        "as A1111 and ComfyUI use.",
    )
    p.add_argument(
        "--single_file_config",
        default=None,
        metavar="DIR_OR_HUB_ID",
        help="For a --model file: the diffusers folder or Hub repo whose configs and tokenizer(s) describe it. "
        "Default: diffusers' usual repo for the file's architecture (needs the Hub once).",
    )
    p.add_argument(
        "--prediction_type",
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Override the scheduler's prediction type (SD 2.x 768-v files: v_prediction; 512 ones: epsilon).",
    )
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="SRC",
        help="An embedding: our output folder, a file (diffusers, A1111 .pt, kohya, OneTrainer, SDXL clip_l/clip_g) "
        "or a Hub repo id. Repeat to load several (e.g. a negative embedding).",
    )
    p.add_argument(
        "--token",
        action="append",
        default=[],
        help="Load an embedding under this word instead of its own. Repeated, the Nth --token renames the Nth "
        '--embedding; --token "" keeps that one\'s own token.',
    )
    p.add_argument("--prompt", required=True, help="Use the embeddings' tokens in it: 'a <cat-toy> backpack'.")
    p.add_argument("--negative_prompt", default=None, help="What to steer away from; may use a loaded token.")
    p.add_argument("--num_images", type=int, default=1, help="Images to make (default 1).")
    p.add_argument("--seed", type=int, default=None, help="Image k uses seed+k. Default: a random seed (printed).")
    p.add_argument("--steps", type=int, default=30, help="Denoising steps (default 30).")
    p.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's (7.5 SD, 5.0 SDXL).")
    p.add_argument(
        "--scheduler",
        default="dpm++",
        choices=list(SCHEDULERS),
        help="Sampler (default dpm++, i.e. DPM-Solver++ 2M); 'default' keeps the model's own.",
    )
    p.add_argument(
        "--clip_skip",
        type=int,
        default=0,
        help="CLIP layers to skip, as diffusers' clip_skip (1: the penultimate layer, A1111's 'Clip skip: 2'). "
        "Use the embedding's training value. Default 0: off.",
    )
    p.add_argument("--height", type=int, default=None, help="Pixels, a multiple of 8. Default: the model's size.")
    p.add_argument("--width", type=int, default=None, help="Pixels, a multiple of 8. Default: the model's size.")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, else fp32."
    )
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a device name.")
    p.add_argument("--out", default="outputs", help="Folder for the PNGs and grid.png (default outputs).")
    return p


def build_convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py convert",
        description="Write an embedding in the layout another tool reads.",
        epilog=textwrap.dedent(convert_embedding.__doc__.split("\n", 2)[2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="Any embedding source, as for --embedding.")
    p.add_argument("out", metavar="OUT", help="Output file, or folder.")
    p.add_argument("--to", required=True, choices=CONVERT_FORMATS)
    p.add_argument("--token", default=None, help="Rename the embedding.")
    return p


def run_generate(args: argparse.Namespace) -> list[Path]:
    from tqdm.auto import tqdm

    for flag, value, low in (
        ("--num_images", args.num_images, 1),
        ("--steps", args.steps, 1),
        ("--clip_skip", args.clip_skip, 0),
    ):
        if value < low:
            raise EmbeddingError(f"{flag} must be at least {low} (got {value})")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 8 or value % 8):
            raise EmbeddingError(f"{flag} must be a positive multiple of 8 (got {value})")
    if len(args.token) > len(args.embedding):
        raise EmbeddingError(
            f"{len(args.token)} --token given for {len(args.embedding)} --embedding; "
            "each --token renames the --embedding in the same position"
        )
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise EmbeddingError(f"--out {out}: is a file; give a folder")

    # Read every embedding before loading the model: a bad file fails in a second, not a minute.
    renames = args.token + [""] * (len(args.embedding) - len(args.token))
    embeddings = [read_embedding(src, token or None) for src, token in zip(args.embedding, renames)]
    print(f"loading {args.model} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    pipe = load_pipeline(args.model, dtype, device, args.single_file_config, args.prediction_type)
    set_scheduler(pipe, args.scheduler)
    layers = min(encoder.config.num_hidden_layers for _, _, encoder in text_encoder_slots(pipe))
    if args.clip_skip >= layers:
        raise EmbeddingError(
            f"--clip_skip {args.clip_skip}: the text encoder has {layers} layers; use at most {layers - 1}"
        )
    triggers = []
    for emb in embeddings:
        tokens = load_embedding(pipe, emb)
        triggers.append(tokens[0])
        print(
            f"loaded {tokens[0]} ({emb.num_vectors} vector{'s' if emb.num_vectors > 1 else ''}, "
            f"{emb.layout}) from {emb.source}",
            file=sys.stderr,
        )
    for token in unused_tokens(pipe, triggers, args.prompt, args.negative_prompt):
        logger.warning("neither --prompt nor --negative_prompt uses %r, so that embedding does nothing", token)

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(
        f"seed {seed}" + (f" (images use {seed}..{seed + args.num_images - 1})" if args.num_images > 1 else ""),
        file=sys.stderr,
    )
    seeds = [seed + k for k in range(args.num_images)]
    guidance = args.guidance_scale if args.guidance_scale is not None else default_guidance_scale(pipe)
    with tqdm(total=args.num_images * args.steps, desc="Denoising", unit="step", dynamic_ncols=True) as bar:
        images = generate(
            pipe,
            args.prompt,
            seeds=seeds,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance_scale=guidance,
            height=args.height,
            width=args.width,
            clip_skip=args.clip_skip,
            on_step=lambda: bar.update(1),
        )

    parameters = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt or "",
        "steps": args.steps,
        "guidance_scale": guidance,
        "scheduler": args.scheduler,
        "width": images[0].size[0],
        "height": images[0].size[1],
        "model": args.model,
        "dtype": str(dtype).removeprefix("torch."),
        **({"clip_skip": args.clip_skip} if args.clip_skip else {}),  # recorded when used, as A1111 does
        "embeddings": [
            {"token": t, "vectors": e.num_vectors, "source": e.source, "sha256": e.sha256}
            for t, e in zip(triggers, embeddings)
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    first = next_image_number(out)
    written = [
        write_png(out / f"{first + k:05d}-{s}.png", image, {**parameters, "seed": s})
        for k, (s, image) in enumerate(zip(seeds, images))
    ]
    written.append(write_grid(out / "grid.png", images, {**parameters, "seeds": seeds}))
    return written


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        return prefix + record.getMessage()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        if argv[:1] == ["convert"]:
            args = build_convert_parser().parse_args(argv[1:])
            for path in convert_embedding(args.src, args.out, args.to, args.token):
                print(path)
            return 0
        if argv[:1] == ["generate"]:
            argv = argv[1:]
        args = build_generate_parser().parse_args(argv)
        import diffusers
        import transformers

        diffusers.logging.set_verbosity_error()
        diffusers.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        for path in run_generate(args):
            print(path)
        return 0
    except EmbeddingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


if __name__ == "__main__":
    sys.exit(main())
