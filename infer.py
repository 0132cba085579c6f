#!/usr/bin/env python
"""Generate images with any Textual Inversion embedding, and convert embeddings between tools.

    python infer.py --model BASE --embedding SRC [--embedding SRC2 ...] --prompt "a <cat-toy> backpack"
    python infer.py --model myFinetune.safetensors [--single_file_config DIR_OR_HUB_ID] ...
    python infer.py convert SRC OUT --to diffusers|a1111|kohya
    python infer.py eval OUTPUT_DIR [--embeddings FILE ...]    score every saved step (CLIP-I, CLIP-T, DINO)
    python infer.py tryout [--photos my_photos] [--sdxl]     the whole loop offline, on a tiny pipeline

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
    ModelFamily             all that differs between SD 1.x/2.x and SDXL, one class each
    inspect_model_file      base models as one original-layout file (A1111, ComfyUI): checked from
                              key names and shapes, converted by diffusers' single-file loaders
    find_model,             the one model loader, for generation, eval and the trainer alike
      load_pipeline
    generate (enable_clip_skip), write_png (A1111's infotext + our JSON), read_png_settings, grids
    convert_embedding
    Scorers, run_eval       CLIP-I, CLIP-T and DINO as the papers compute them; `eval` over a run's
                              saved steps (run.json), the pick rule, --keep_best
    main                    the command line

Safety: .pt/.bin/.ckpt files (embeddings and model checkpoints) are pickles, and a pickle can run
code when it is loaded. They are read only with torch.load(weights_only=True), which builds
nothing but tensors and plain containers; a file that needs anything else is refused before any
of it runs.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import mmap
import os
import random
import re
import shutil
import socket
import sys
import textwrap
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import save as save_safetensors

logger = logging.getLogger("infer")


class UserError(Exception):
    """A problem with the user's input (an embedding, a model, a photo, a flag, a full disk), said
    in one line that names the flag or file and what to do. Both command lines (this one and
    textual_inversion.py) print it without a traceback and exit with `status`; API callers can
    catch it."""

    status = 2


def first_line(error: BaseException) -> str:
    """An exception's message for a one-line error: its first line, else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------
# Writers. Every format is written here and nowhere else; every write is atomic.

# What a failed write's message ends with: what to do once its cause is fixed. The trainer sets
# its own (a run goes on from its last checkpoint).
WRITE_FAILURE_ADVICE = ""


def write_error(path: str | Path, error: OSError) -> UserError:
    """A file that could not be written (a full disk, a read-only folder), in one line naming the
    file and the cause. Its previous version is intact and no temp file is left."""
    cause = error.strerror or str(error) or type(error).__name__
    return UserError(f"cannot write {path}: {cause[0].lower() + cause[1:]}{WRITE_FAILURE_ADVICE}")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` for a temp file beside `path`, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never half a file; an
    OSError (ENOSPC, EACCES, ...) removes the temp file and becomes a UserError (write_error).
    """
    path = Path(path)
    tmp = None
    try:
        name = str(path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp"))
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the mode new files get (umask)
        tmp = name
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_folder(path.parent)
    except OSError as e:
        raise write_error(path, e) from e  # the cause stays: a folder being filled names itself instead
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


def atomic_folder(
    path: str | Path, fill: Callable[[Path], None], *, merge: bool = False, last: tuple[str, ...] = ()
) -> Path:
    """Call `fill(tmp_folder)` for a temp folder beside `path`, then rename it to `path`.

    The folder appears complete or not at all. With `merge`, `path` keeps what else it holds
    (a full pipeline's folders beside the embeddings, checkpoints and lock): each entry of the
    temp folder replaces its namesake there whole, those named in `last` at the end (a
    pipeline's model_index.json, so a loader never takes a half-moved folder for a pipeline).
    Write the files with the writers here, or with any code that raises OSError; a failed write
    names `path` (write_error), and the temp folder is removed.
    """
    path = Path(path)
    # Merged, the temp folder sits inside `path`, where a killed run's leftovers are looked for.
    tmp = path / ".merge.tmp" if merge else path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old.tmp")  # the previous version, until the new one is in place
    try:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        if merge:
            for item in sorted(tmp.iterdir(), key=lambda p: (p.name in last, p.name)):
                if item.is_dir():  # replaced whole, as the folder itself is without `merge`
                    atomic_folder(path / item.name, lambda dest, item=item: os.replace(item, dest))
                else:
                    os.replace(item, path / item.name)
        else:
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        fsync_folder(path.parent)
    except (OSError, UserError) as e:  # a file inside could not be written: the folder could not
        cause = e.__cause__ if isinstance(e, UserError) else e
        raise write_error(path, cause) from cause
    finally:
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def append_text(path: str | Path, text: str) -> Path:
    """Append `text` durably (a log: rewriting it each time would grow quadratically). A crash
    can leave a torn last line, which read_jsonl drops; a failed append is cut back off."""
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


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a .jsonl log (none if it does not exist). A line that does not parse, as the
    torn last line of a write cut short, even mid-character, is left out."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_torch(path: str | Path, data: object) -> Path:
    """A torch pickle, serialized in memory first so a full disk is a plain OSError (torch.save
    onto a full disk raises a RuntimeError from C++ instead).

    Written in torch's legacy (non-zip) format: A1111 checks every pickle before loading it and
    refuses zip entries it does not know, and recent torch adds some (torch 2.13's zip holds
    .format_version and .storage_alignment, refused by A1111 1.10; older A1111 releases refuse
    byteorder too). The legacy format holds the same pickle and loads in A1111, diffusers,
    ComfyUI, kohya, InvokeAI and torch.load(weights_only=True); only mmap needs the zip."""
    buffer = io.BytesIO()
    torch.save(data, buffer, _use_new_zipfile_serialization=False)
    return write_bytes(path, buffer.getvalue())


LOCK_FILE = ".textual_inversion.lock"


class OutputLock:
    """--output_dir/.textual_inversion.lock (pid, host, start time): one run per output folder,
    and no `infer.py eval --keep_best` rewriting it while a run trains there.

    Taken (by the main process) before anything is read or written there, released on every way
    out. A lock whose process is gone from this host is stale and taken over with a warning. A
    folder made only to hold the lock is removed again if the run wrote nothing.
    """

    def __init__(self, folder: Path, enabled: bool = True, flag: str = "--output_dir"):
        self.folder, self.enabled, self.flag = folder, enabled, flag
        self.path = folder / LOCK_FILE
        self.mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def __enter__(self) -> OutputLock:
        if not self.enabled:
            return self
        self.made_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    self.take_over_if_stale()
                    continue
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(self.mine, f)
                except OSError:
                    self.path.unlink(missing_ok=True)  # an empty lock would look like a run killed while taking it
                    raise
                return self
        except OSError as e:
            raise UserError(f"{self.flag} {self.folder}: cannot create the lock file {self.path} ({e})") from None
        raise UserError(f"{self.flag} {self.folder}: another run took its lock file {self.path} just now")

    def take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host, started = int(holder["pid"]), holder["host"], holder["started"]
        except (OSError, ValueError, KeyError, TypeError):
            holder = None  # empty or torn: its writer was killed between creating and writing it
        if holder is not None and not (host == self.mine["host"] and (pid == os.getpid() or not pid_alive(pid))):
            raise UserError(
                f"{self.flag} {self.folder} is in use by another run: process {pid} on {host}, started {started} "
                f"(lock file {self.path}); wait for it, use another --output_dir, or delete the lock file if "
                "that run is gone"
            )
        logger.warning("Taking over the lock of a run that is gone (%s)", holder or "an unreadable lock file")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
            if self.made_folder and not any(self.folder.iterdir()):
                self.folder.rmdir()
        except (OSError, ValueError):
            pass  # never hide the run's own outcome behind a cleanup problem


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


def remove_temp_files(out: Path) -> None:
    """The temp files and folders a killed run left behind (never taken for complete files)."""
    for leftover in [*out.glob(".*.tmp"), *out.glob("validation/.*.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


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
# Output names: what a training run writes into its --output_dir, composed and read back here
# only (by the trainer, eval, and every reader of a run's folder).

EMBEDS = "learned_embeds"  # diffusers' name for an embedding file
LAST = "-last"  # the last step's rows, when early stopping kept an earlier step's
BEFORE_EVAL = "-before-eval"  # a final file as it was before `eval --keep_best` rewrote it
TOKEN_FILE = "token_identifier.txt"  # the word to prompt with, beside the embedding


def embeds_name(extension: str, tag: str = "", second: bool = False) -> str:
    """learned_embeds[_2][TAG].EXT: _2 holds SDXL's second text encoder's rows; TAG is "" for the
    run's result, steps_tag(N), LAST, or one of them + BEFORE_EVAL."""
    return f"{EMBEDS}{'_2' if second else ''}{tag}{extension}"


def steps_tag(step: int) -> str:
    """The tag of the rows saved at step N (every --save_steps)."""
    return f"-steps-{step}"


def is_steps_file(name: str) -> bool:
    """Rows saved every --save_steps: a run's history, not its result."""
    return "-steps-" in name


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


RUN_RECORD = "run.json"  # written by textual_inversion.py: what eval needs to rebuild the run
CONCEPTS_FILE = "concepts.json"  # a run of several concepts (--concepts_list): their names, in order


def concept_folders(folder: Path) -> list[Path]:
    """The concept folders of a run that trained several concepts (--concepts_list): each
    `folder/<name>/` holds the files a one-concept run writes in its --output_dir. [] for any other
    folder. Checkpoints and Hub folders of such a run have the same layout."""
    listing = folder / CONCEPTS_FILE
    if not listing.is_file():
        return []
    try:
        names = json.loads(listing.read_text(encoding="utf-8"))["concepts"]
        if not isinstance(names, list) or not names:
            raise ValueError("'concepts' is not a list of folder names")
        for name in names:  # a folder right here, never a path elsewhere
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                raise ValueError(f"{name!r} is not a folder name")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{listing}: not a list of concepts ({first_line(e)}); delete it or rewrite it") from None
    return [folder / name for name in names]


def write_concepts(folder: Path, names: list[str]) -> Path:
    """folder/concepts.json: a run's concept folders, in order (what concept_folders reads)."""
    return write_text(folder / CONCEPTS_FILE, json.dumps({"concepts": names}, indent=1) + "\n")


def present_concepts(folder: Path) -> list[Path]:
    """concept_folders(folder), each checked to be there: a folder listed but missing must not be
    taken for a Hub repo id (out/anna) by the readers."""
    folders = concept_folders(folder)
    for concept in folders:
        if not concept.is_dir():
            raise UserError(f"{folder / CONCEPTS_FILE}: lists {concept.name!r}, but {concept} is not a folder")
    return folders


def read_embeddings(src: str | Path, token: str | None = None, flag: str | None = None) -> list[Embedding]:
    """What SRC holds, read: every concept of a run of several concepts (its folder, a checkpoint-N
    of it, or its Hub repo), one Embedding each in training order, each under the token its own
    folder gives; else [read_embedding(src, token, flag)]."""
    name = str(src)
    path = Path(name).expanduser()
    label = f"{flag} {name}" if flag else name
    if path.is_dir():
        folders = present_concepts(path)
    elif hub_repo(name) == name:  # a repo id, not one file of a repo
        snapshot = hub_concepts(name, label)
        folders = present_concepts(snapshot) if snapshot is not None else []
    else:
        folders = []
    if not folders:
        return [read_embedding(src, token, flag)]
    if token is not None:
        raise UserError(
            f"{label}: a run of {plural(len(folders), 'concept')}, each with its own token; to load one under "
            f"another word, give its folder (e.g. {path / folders[0].name}) with --token (token= in Python)"
        )
    # Each named as SRC/<concept>: for a Hub repo that is repo/<concept>, not the cache's path.
    return [replace(read_embedding(concept, flag=flag), source=f"{label}/{concept.name}") for concept in folders]


def hub_concepts(repo: str, label: str) -> Path | None:
    """The Hub repo's files of a run of several concepts (concepts.json and each concept's final
    embedding files and token), downloaded once into the Hugging Face cache; None when the repo
    has no concepts.json (or the Hub cannot say: files_from_hub then reads it, or says why not)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    check_source(repo, "")
    try:
        listing = Path(hf_hub_download(repo, CONCEPTS_FILE))
    except Exception:
        return None
    names = [concept.name for concept in concept_folders(listing.parent)]
    wanted = [f"{EMBEDS}.*", f"{EMBEDS}_2.*", TOKEN_FILE]
    try:
        return Path(
            snapshot_download(repo, allow_patterns=[CONCEPTS_FILE, *(f"{n}/{w}" for n in names for w in wanted)])
        )
    except Exception as e:
        raise UserError(f"{label}: the Hugging Face Hub could not provide its concepts ({first_line(e)})") from None


# The same names read back: any learned_embeds[_2][TAG].EXT (second, tag, extension); a run's own
# embedding files (N of -steps-N); its -steps-N files alone (N, extension); its checkpoints (N).
EMBEDS_NAME = re.compile(r"learned_embeds(_2)?(-[\w-]+)?(\.\w+)")
RUN_EMBEDS_NAME = re.compile(r"learned_embeds(?:-steps-(\d+)|-last)?(?:-before-eval)?\.(?:safetensors|bin)")
STEPS_NAME = re.compile(r"learned_embeds-steps-(\d+)\.(safetensors|bin)")
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


# ----------------------------------------------------------------------------------------
# Reading: any SRC -> one normalized Embedding.
#
# Slots name the text encoder a set of vectors belongs to, as the SDXL single-file layout does:
# "clip_l" is a pipeline's first text encoder (CLIP ViT-L for SD 1.x and SDXL, OpenCLIP ViT-H
# for SD 2.x), "clip_g" its second (SDXL only). A plain SD embedding fills "clip_l". Each model
# family names its encoders' slots (ModelFamily.slots).

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


@dataclass
class Embedding:
    """A Textual Inversion embedding, whatever file it came from."""

    token: str  # the prompt word; multi-vector embeddings add token_1 ... token_{N-1} too
    vectors: dict[str, torch.Tensor]  # slot ("clip_l", "clip_g") -> float32 [N, D], in slot order
    source: str  # what the user gave: a path or a Hub id
    layout: str  # "diffusers", "A1111", "kohya", "SDXL", "diffusers SDXL pair", ...
    files: list[Path] = field(default_factory=list)  # the files the vectors were read from
    sha256: list[str] = field(default_factory=list)  # one per file
    # Other words that call it in prompts: a file's name, as A1111 and ComfyUI call embeddings,
    # when the token inside differs (an A1111 .pt named "charturner" saved as charturnerv2.pt).
    aliases: tuple[str, ...] = ()

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(v.shape[1] for v in self.vectors.values())

    @property
    def a1111_name(self) -> str:
        """The name A1111 knows it by: its file name when it has one, else its token."""
        return self.aliases[0] if self.aliases else self.token


def read_embedding(src: str | Path, token: str | None = None, flag: str | None = None) -> Embedding:
    """Read any SRC (folder, file, Hub id) into an Embedding; `token` renames it. Messages, and
    the Embedding's source, name it with the `flag` that gave it, if any.

    Nothing is installed anywhere; the result is plain float32 tensors on the CPU.
    """
    name = str(src)
    source = f"{flag} {name}" if flag else name
    path = Path(name).expanduser()
    if path.is_dir() and (concepts := concept_folders(path)):
        names = ", ".join(str(concept) for concept in concepts)
        raise UserError(f"{source}: a run of {len(concepts)} concepts; give each concept's folder on its own: {names}")
    if path.is_dir():
        files = embedding_files_in_folder(path, source)
    elif path.is_file():
        files = with_pair_partner(path)
    elif looks_like_hub_id(name):
        files = files_from_hub(name, source)
    else:
        raise UserError(f"{source}: no such file or folder (and not a Hub repo id like org/name)")
    if token is not None and not token.strip():
        raise UserError(f"{source}: the token to rename it to is empty")

    parsed = [parse_embedding_data(load_tensor_file(f, source), f, source) for f in files]
    if len(parsed) == 2:  # the diffusers SDXL pair: one file per text encoder
        (token_l, vec_l, _), (token_g, vec_g, _) = parsed
        if list(vec_l) != ["clip_l"] or list(vec_g) != ["clip_l"] or token_l != token_g:
            raise UserError(
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
        raise UserError(f"{source}: its text encoders have different numbers of vectors ({shapes})")
    word = token or file_token or token_from_file_name(files[0])
    # A single file also answers to its name, unless the user chose the word (--token) or the
    # name is diffusers' generic one.
    stem = files[0].stem
    named = token is None and len(files) == 1 and not stem.startswith(EMBEDS) and stem != word
    return Embedding(
        token=word,
        vectors=vectors,
        source=source,
        layout=layout,
        files=files,
        sha256=[sha256_of(f) for f in files],
        aliases=(stem,) if named else (),
    )


def embedding_files_in_folder(folder: Path, source: str) -> list[Path]:
    """The file(s) to read in a folder: learned_embeds(.safetensors|.bin) (with its _2 partner
    for SDXL) when present; else, in a run stopped before its end, the newest rows it saved
    (see newest_saved_rows), with a warning naming them; else the folder's only embedding-like file."""
    for extension in (".safetensors", ".bin"):
        main = folder / embeds_name(extension)
        if main.is_file():
            return with_pair_partner(main)
    newest = newest_saved_rows(folder)
    if newest is not None:
        step, path = newest
        logger.warning(
            "%s has no learned_embeds file (a stopped run?); using its newest rows, step %d: %s", source, step, path
        )
        return with_pair_partner(path)
    candidates = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix in EMBEDDING_SUFFIXES and not p.name.startswith(".") and not is_steps_file(p.name)
    )
    if len(candidates) == 1:
        return with_pair_partner(candidates[0])
    if not candidates:
        raise UserError(
            f"{source}: no embedding file in this folder (looked for learned_embeds.safetensors/.bin, "
            f"or any one {'/'.join(EMBEDDING_SUFFIXES)} file)"
        )
    names = ", ".join(p.name for p in candidates[:6]) + (", ..." if len(candidates) > 6 else "")
    raise UserError(f"{source}: this folder holds {len(candidates)} embedding files ({names}); give one of them")


def newest_saved_rows(folder: Path) -> tuple[int, Path] | None:
    """(step, file) of the newest rows a training run's folder holds besides learned_embeds.*:
    the highest step among its learned_embeds-steps-N files and its checkpoint-N/ folders'
    learned_embeds files (a tie goes to the -steps-N file; .safetensors before .bin). None if
    it has neither."""
    found = []
    for path in folder.iterdir():
        if (match := STEPS_NAME.fullmatch(path.name)) and path.is_file():
            found.append((int(match[1]), 1, match[2] == "safetensors", path))
        elif match := CHECKPOINT_NAME.fullmatch(path.name):
            for extension in (".safetensors", ".bin"):
                saved = path / embeds_name(extension)
                if saved.is_file():
                    found.append((int(match[1]), 0, extension == ".safetensors", saved))
    if not found:
        return None
    step, _, _, path = max(found, key=lambda entry: entry[:3])
    return step, path


def with_pair_partner(path: Path) -> list[Path]:
    """[path], or [first, second] when it is half of a diffusers SDXL pair
    (learned_embeds[SUFFIX].ext + learned_embeds_2[SUFFIX].ext side by side, SUFFIX being
    -steps-N, -last, -before-eval, ...)."""
    match = EMBEDS_NAME.fullmatch(path.name)
    if not match:
        return [path]
    first = path.with_name(embeds_name(match[3], match[2] or ""))
    second = path.with_name(embeds_name(match[3], match[2] or "", second=True))
    if first.is_file() and second.is_file():
        return [first, second]
    return [path]


def looks_like_hub_id(source: str) -> bool:
    """org/name, or org/name/path/to/file, as the Hub spells repo ids."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[^\s]+)?", source) is not None and ".." not in source


HUB_PROBE_SECONDS = 5  # a reachable Hub answers in well under a second


def hub_repo(source: str) -> str | None:
    """The Hub repo (org/name) that `source` names, or None when it is a local path: one that
    exists, one that cannot be a Hub id (./name, /abs, ~/x), or one inside a local folder that
    exists (runs/tiny-sd with runs/ here), which is a typo, not a repo."""
    if Path(source).expanduser().exists() or not looks_like_hub_id(source):
        return None
    if Path(source.split("/", maxsplit=1)[0]).expanduser().is_dir():
        return None
    return "/".join(source.split("/")[:2])


@functools.cache
def hub_unreachable(endpoint: str) -> str | None:
    """Why the Hub at `endpoint` does not answer (one try), or None when it does. The Hub
    libraries retry a dead connection for about 20 s per file and a model has dozens."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_SECONDS)  # any answer, an error status too, is a Hub
    except Exception as e:
        return first_line(e)
    return None


def check_source(source: str | Path | None, flag: str, repo_type: str = "model") -> None:
    """Fail at once, in one line, on a model, scorer, dataset or embedding that cannot be had: a
    local path that does not exist, or a Hub id while the Hub does not answer (with the fixes:
    the cache offline, `hf download`, a local folder), instead of the libraries' retries. Each
    command calls it on its sources before it loads anything."""
    if source is None:
        return
    name = str(source)
    label = f"{flag} {name}" if flag else name
    repo = hub_repo(name)
    if repo is None:
        path = Path(name).expanduser()
        if path.exists():
            return
        kind = "file" if path.suffix.lower() in (*MODEL_FILE_SUFFIXES, *EMBEDDING_SUFFIXES) else "folder"
        hint = "" if "/" in name or name.startswith((".", "~")) else " (a Hub id is written org/name)"
        raise UserError(f"{label}: no such {kind}{hint}")
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():  # the cache answers at once, or the libraries say at once that it cannot
        return
    reason = hub_unreachable(constants.ENDPOINT)
    if reason is None:
        return
    download = f"hf download {repo}" + (f" --repo-type {repo_type}" if repo_type != "model" else "")
    cache = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo.replace('/', '--')}"  # the libraries' layout
    offline = (
        "it is in your Hugging Face cache, so run with HF_HUB_OFFLINE=1"
        if (cache / "snapshots").is_dir()
        else "run with HF_HUB_OFFLINE=1 if it is in your Hugging Face cache"
    )
    raise UserError(
        f"{label}: the Hugging Face Hub cannot be reached ({reason}); {offline}, download it once with "
        f"`{download}` where there is a network, or give a local folder"
    )


def photos_folder(source: str | Path, flag: str = "--train_data_dir") -> Path:
    """The folder of photos `source` names: a local folder as it is (its callers check it), or a
    Hub dataset (org/name[/subfolder]) such as diffusers' cat-toy photos, diffusers/cat_toy_example,
    whose images and caption files are downloaded once into the Hugging Face cache."""
    name = str(source)
    repo = hub_repo(name)
    if repo is None:
        return Path(name).expanduser()
    check_source(name, flag, repo_type="dataset")
    return hub_dataset(repo, flag) / name[len(repo) + 1 :]


@functools.cache
def hub_dataset(repo: str, flag: str) -> Path:
    """A Hub dataset's images and caption files, in the Hugging Face cache (fetched once per process)."""
    from huggingface_hub import snapshot_download

    extensions = sorted(IMAGE_EXTENSIONS | {e.upper() for e in IMAGE_EXTENSIONS} | {".txt", ".caption"})
    try:
        return Path(snapshot_download(repo, repo_type="dataset", allow_patterns=[f"*{e}" for e in extensions]))
    except Exception as e:
        raise UserError(
            f"{flag} {repo}: not a local folder, and the Hub could not provide it as a dataset ({first_line(e)})"
        ) from None


def files_from_hub(source: str, label: str) -> list[Path]:
    """Download (or find in the Hugging Face cache) the embedding file(s) of a Hub repo (messages
    name it as `label`).

    Only small top-level embedding files are fetched, never a model's weights: a repo id given
    by mistake for a whole model must not start a multi-gigabyte download.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    check_source(source, "")
    parts = source.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    entries = names = None
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
            names = [e.path for e in entries if e.path.startswith(EMBEDS)] or [
                e.path for e in entries if e.path.endswith(EMBEDDING_SUFFIXES) and e.size <= MAX_EMBEDDING_BYTES
            ]
            if names:
                allow = [*names, TOKEN_FILE]
                folder = Path(snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=["*/*"]))
    except Exception as e:
        reason = first_line(e)
        raise UserError(
            f"{label}: not a local file or folder, and the Hugging Face Hub could not provide it ({reason})"
        ) from None
    if entries is not None and not names:
        listed = ", ".join(e.path for e in entries[:8])
        raise UserError(f"{label}: no embedding file on the Hub repo (it holds: {listed or 'nothing'})")
    return embedding_files_in_folder(folder, label)


def load_tensor_file(path: Path, source: str) -> object:
    """The contents of a safetensors file or, safely, of a torch pickle (.pt/.bin/.ckpt)."""
    size = path.stat().st_size
    if size > MAX_EMBEDDING_BYTES:
        raise UserError(
            f"{source}: {path.name} is {size / 2**20:.0f} MB, far bigger than an embedding "
            "(kilobytes); is it a model checkpoint or a LoRA?"
        )
    if is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise UserError(f"{source}: {path.name} is not a readable safetensors file ({e})") from None
    return load_pickle(path, source)


def is_safetensors(path: Path) -> bool:
    """Decided by content, not by name (files are often renamed): safetensors starts with an
    8-byte header length followed by the JSON header."""
    with open(path, "rb") as f:
        return f.read(9)[8:9] == b"{"


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
            raise UserError(
                f"{refused} needs the Python object {needed[1]} to load, not just tensors, so it could run "
                f"code; {advice}"
            ) from None
        unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
        if unpickler:
            raise UserError(f"{refused} the tensors-only loader cannot read ({unpickler[1]}); {advice}") from None
        reason = first_line(e)
        raise UserError(
            f"{source}: {path.name} is neither safetensors nor a readable PyTorch file; is it truncated or "
            f"corrupt? ({reason})"
        ) from None


def parse_embedding_data(data: object, path: Path, source: str) -> tuple[str | None, dict[str, torch.Tensor], str]:
    """(token or None, {slot: [N, D]}, layout name) from a loaded file's contents, in any layout
    the module docstring lists. An A1111 file's token is its "name" field, as diffusers reads it
    (A1111 itself calls it by its file name; for files A1111 wrote the two agree). A file without
    a token is called by --token, else as token_from_file_name says."""
    if isinstance(data, torch.Tensor):  # a bare tensor saved with torch.save
        return None, {"clip_l": as_rows(data, path, source)}, "bare tensor"
    if not isinstance(data, dict):
        raise UserError(f"{source}: {path.name} holds a {type(data).__name__}, not an embedding")

    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        try:
            params = {"*": params} if isinstance(params, torch.Tensor) else dict(params)
        except (TypeError, ValueError):
            raise UserError(f"{source}: {path.name} has a string_to_param that is not a set of vectors") from None
        if len(params) != 1:
            raise UserError(f"{source}: A1111 file {path.name} has {len(params)} vector sets; expected one")
        name = data.get("name")
        token = name if isinstance(name, str) and name.strip() else None
        return token, {"clip_l": as_rows(next(iter(params.values())), path, source)}, "A1111"

    if "clip_l" in data or "clip_g" in data:  # SDXL single file (or a clip_l-only one)
        vectors = {s: as_rows(data[s], path, source) for s in ("clip_l", "clip_g") if s in data}
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
    raise UserError(f"{source}: {path.name} is not an embedding layout this reads (keys: {shown}){hint}")


def as_rows(value: object, path: Path, source: str) -> torch.Tensor:
    """float32 [N, D] from the shapes tools write: [D] (one vector), [N, D], or [1, N, D]."""
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{source}: {path.name} holds a {type(value).__name__} where a tensor should be")
    rows = value.detach().to("cpu", torch.float32)
    if rows.ndim == 1:
        rows = rows.unsqueeze(0)
    elif rows.ndim == 3 and rows.shape[0] == 1:
        rows = rows[0]
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise UserError(f"{source}: {path.name} holds a tensor of shape {list(value.shape)}, not [vectors, width]")
    if not torch.isfinite(rows).all():
        raise UserError(f"{source}: {path.name} contains NaN or infinite values (did its training diverge?)")
    return rows.clone()


def token_from_file_name(path: Path) -> str:
    """The token of a file that carries none: the one in token_identifier.txt beside it when
    that file was written with it (our SDXL <name>.safetensors, diffusers folders), else the
    file name, as A1111 and ComfyUI call embeddings."""
    identifier = path.with_name(TOKEN_FILE)
    if identifier.is_file():
        written = identifier.read_text(encoding="utf-8").strip()
        if written and (path.name.startswith(EMBEDS) or file_name_for_token(written) == path.stem):
            return written
    return path.stem


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# Photos, as the trainer reads them and eval scores them; and a phrase as starting rows.

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MASK_SUFFIX = "-masklabel.png"  # OneTrainer's convention: NAME-masklabel.png beside NAME.jpg


def list_images(
    folder: Path, companions: tuple[str, ...] = (), flag: str = "--train_data_dir", warn: bool = True
) -> list[Path]:
    """Image files in `folder`, sorted, as the trainer takes them for photos; masks
    (NAME-masklabel.png) and files ending in one of `companions` (caption extensions) belong to
    photos; anything else is skipped, with one warning when `warn`."""
    if not folder.exists():
        raise UserError(f"{flag} {folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: not a folder")
    entries = sorted(folder.iterdir())
    belongs = [p for p in entries if p.is_file() and p.name.lower().endswith((MASK_SUFFIX, *companions))]
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p not in belongs]
    skipped = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in images and p not in belongs]
    if not images:
        found = f" (it holds: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})" if skipped else ""
        raise UserError(f"{flag} {folder}: no images (png, jpg, webp, bmp, tiff, gif) found{found}")
    if skipped and warn:
        logger.warning(
            "Skipping %s in %s: %s",
            plural(len(skipped), "non-image entry", "non-image entries"),
            folder,
            ", ".join(skipped),
        )
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


def phrase_shares(tokens: int, num_vectors: int) -> list[range]:
    """Which of a phrase's T tokens each of N vectors starts from: token i*T/N (rounded down)
    when N >= T, as A1111 spreads a phrase; else its consecutive share of the phrase."""
    shares = []
    for i in range(num_vectors):
        first = i * tokens // num_vectors
        shares.append(range(first, max((i + 1) * tokens // num_vectors, first + 1)))
    return shares


def phrase_rows(weight: torch.Tensor, ids: list[int], num_vectors: int) -> torch.Tensor:
    """fp32 [N, D] starting rows from a phrase's tokens: each vector the mean of its share."""
    shares = phrase_shares(len(ids), num_vectors)
    return torch.stack([weight[ids[share.start : share.stop]].float().mean(dim=0) for share in shares])


# ----------------------------------------------------------------------------------------
# Installing: one Embedding -> the pipeline's tokenizer(s) and text encoder(s).


def text_encoder_slots(pipe) -> list[tuple[str, object, torch.nn.Module]]:
    """[(slot, tokenizer, text encoder)] for each text encoder of the pipeline's family."""
    family = family_of_pipeline(pipe)
    return [
        (slot, getattr(pipe, tokenizer), getattr(pipe, encoder))
        for slot, tokenizer, encoder in zip(family.slots, family.tokenizers, family.encoders)
    ]


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
    elif set(emb.vectors) < set(base):
        problem = f", and the base model needs vectors for each of its text encoders ({' and '.join(base)})"
    else:
        problem = f"; it has {' and '.join(emb.vectors)} vectors, the base model needs {' and '.join(base)}"
    encoders = "text encoders take" if len(want) > 1 else "text encoder takes"
    made_for, base_is = model_for_widths(have), model_for_widths(want)
    options = [f"load it on an {made_for} model"] if made_for else []
    options.append(f"use an embedding made for {base_is or 'this base model'}")
    have_text = "+".join(map(str, have)) + " wide" + (f", made for {made_for}" if made_for else "")
    raise UserError(
        f"{emb.source}: its vectors are {have_text}, but the base model's {encoders} "
        f"{'+'.join(map(str, want))}{f' ({base_is})' if base_is else ''}{problem}; {', or '.join(options)}"
    )


def prompt_form(token: str, tokenizer) -> str:
    """The token as the tokenizer sees prompt text. CLIP lowercases prompts, and diffusers'
    multi-vector expansion only finds tokens stored in that form, so a capitalised
    multi-vector token (A1111's EasyNegative) would silently use its first vector alone."""
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    return normalizer.normalize_str(token) if normalizer is not None else token


def vector_tokens(word: str, num_vectors: int) -> list[str]:
    """A word's tokens, one per vector: "<cat-toy>", "<cat-toy>_1", ... (diffusers' multi-vector naming)."""
    return [word] + [f"{word}_{i}" for i in range(1, num_vectors)]


def install_embedding(pipe, emb: Embedding) -> list[str]:
    """Add the embedding's tokens to every tokenizer and its vectors to every text encoder of
    `pipe`, as diffusers' load_textual_inversion does (it does the writing); return the tokens
    added: [token, token_1, ..., token_{N-1}], the first being the one to write in prompts."""
    slots = text_encoder_slots(pipe)
    if not hasattr(pipe, "load_textual_inversion"):
        raise UserError(f"{emb.source}: {type(pipe).__name__} has no CLIP text encoder to load an embedding into")
    vectors = fit_to_base(emb, base_widths(pipe))
    first_tokenizer = slots[0][1]  # the one prompts are read with
    token = prompt_form(emb.token.strip(), first_tokenizer)
    tokens = vector_tokens(token, emb.num_vectors)

    for _, tokenizer, _ in slots:
        vocab = tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken:
            earlier = " (an embedding loaded earlier has it)" if taken[0] in tokenizer.added_tokens_encoder else ""
            raise UserError(
                f"{emb.source}: token {taken[0]!r} already exists in the base model's vocabulary{earlier}; "
                f"load this embedding under another name with --token (token= in Python), "
                f"e.g. --token '<{file_name_for_token(token)}-2>'"
            )
    if len(first_tokenizer.encode(token, add_special_tokens=False)) == 1:
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

    # The embedding's aliases (its file name) call the token in prompts: normalize_prompt writes
    # them as the token. An alias that is already a loaded token or alias, or a word the model
    # knows, is left alone with a warning (it keeps its meaning).
    aliases = vars(pipe).setdefault(ALIASES, {})
    for alias in emb.aliases:
        form = prompt_form(alias.strip(), first_tokenizer)
        if not form or form == token:
            continue
        pieces = first_tokenizer.tokenize(form)
        added = first_tokenizer.added_tokens_encoder
        known = len(pieces) == 1 and pieces[0] not in added and pieces[0] in first_tokenizer.get_vocab()
        if form in aliases or form in added or known:
            logger.warning(
                "%s: its file name %r already means something in prompts; call this embedding %r",
                emb.source,
                alias,
                token,
            )
            continue
        aliases[form] = token
    return tokens


ALIASES = "embedding_aliases"  # the pipeline attribute holding {alias in prompt form: token}


def load_embedding(pipe, src: str | Path | Embedding, token: str | None = None) -> list[str]:
    """Load any embedding (folder, file, Hub id, or an Embedding already read) into `pipe`.

    Returns the tokens it added, [token, token_1, ..., token_{N-1}]; write the first one in
    prompts and the pipeline expands it to all N. `token` renames the embedding. A run of several
    concepts loads every concept, its tokens returned concept after concept. Raises
    UserError, with a one-line message, for anything the user has to fix.
    """
    if isinstance(src, Embedding):
        embeddings = [replace(src, token=token) if token else src]
    else:
        embeddings = read_embeddings(src, token)
    return [added for emb in embeddings for added in install_embedding(pipe, emb)]


# ----------------------------------------------------------------------------------------
# Prompts.


def normalize_prompt(pipe, prompt: str | None) -> str | None:
    """Write each loaded embedding in the prompt as its token is stored: in lower case for CLIP,
    so that diffusers expands multi-vector tokens however the user capitalised them; aliases
    (file names, as A1111 and ComfyUI call embeddings) as the token they stand for; and
    ComfyUI's `embedding:NAME` as NAME's token."""
    if not prompt:
        return prompt
    tokenizer = text_encoder_slots(pipe)[0][1]
    ignore_case = prompt_form("A", tokenizer) == "a"
    words = {t.content: t.content for t in tokenizer.added_tokens_decoder.values() if not t.special}
    patterns = {token: re.escape(token) for token in words}
    for alias, token in getattr(pipe, ALIASES, {}).items():
        words[alias] = token
        patterns[alias] = rf"(?<!\w){re.escape(alias)}(?!\w)"  # a whole word: "cat" must not match in "cats"
    if not words:
        return prompt
    # One pass, longest first, so that no word is matched inside a longer one ("cat-toy" in "<cat-toy>").
    alternatives = "|".join(patterns[w] for w in sorted(words, key=len, reverse=True))
    pattern = re.compile(rf"(?:embedding:)?(?:{alternatives})", re.IGNORECASE if ignore_case else 0)

    stored = {(w.lower() if ignore_case else w): token for w, token in words.items()}

    def written(match: re.Match) -> str:
        text = match[0]
        if text.lower().startswith("embedding:"):
            text = text[len("embedding:") :]
        return stored.get(text.lower() if ignore_case else text, text)

    return pattern.sub(written, prompt)


def unused_tokens(pipe, tokens: Iterable[str], *prompts: str | None) -> list[str]:
    """The tokens that none of the prompts uses: loaded embeddings that will do nothing."""
    tokenizer = text_encoder_slots(pipe)[0][1]
    seen = set()
    for prompt in prompts:
        if prompt:
            seen.update(tokenizer.tokenize(normalize_prompt(pipe, prompt)))
    return [t for t in tokens if t not in seen]


# ----------------------------------------------------------------------------------------
# Pipelines and generation.


def check_pixels(flag: str, value: int | None) -> None:
    """An image size in pixels (None: the model's): the VAE works on multiples of 8."""
    if value is not None and (value < 8 or value % 8):
        raise UserError(f"{flag} must be a positive multiple of 8 (got {value})")


def check_clip_skip(clip_skip: int, layers: int) -> None:
    """--clip_skip against the text encoder's `layers`: at least one layer must remain."""
    if clip_skip >= layers:
        raise UserError(f"--clip_skip {clip_skip}: the text encoder has {layers} layers; use at most {layers - 1}")


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
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if name == "auto":
        return torch.device(next((kind for kind, present in available.items() if present()), "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (auto, cuda, cuda:1, mps, cpu)") from None
    if device.type in available and not available[device.type]():
        raise UserError(f"--device {name}: {device.type.upper()} is not available here; use --device auto or cpu")
    return device


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --dtype's names besides auto


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float16 on CUDA (half the memory, same images to the eye), float32 elsewhere
    (CPU float16 is slow, and float16 on MPS can produce black images with some models)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# ----------------------------------------------------------------------------------------
# Model families: all that differs between SD 1.x/2.x and SDXL, behind one contract. The
# trainer and both command lines ask a model's family and never test which one it is; a new
# family is one subclass of ModelFamily and its entry in MODEL_FAMILIES.


Size = tuple[int, int]  # (height, width) or (top, left), in pixels


class ModelFamily:
    """The contract of a model family. Families are classes, used as they are (never instantiated)."""

    name: str  # what run.json and checkpoints record, and a resume checks
    encoders: tuple[str, ...]  # the pipeline's text encoders, in slot order
    encoder_classes: tuple[str, ...]  # their transformers classes
    tokenizers: tuple[str, ...]  # one per text encoder
    tokenizer_class = "CLIPTokenizer"
    slots: tuple[str, ...]  # an embedding's key for each encoder's vectors (the clip_l/clip_g file's)
    pipeline_class: str  # diffusers' text-to-image pipeline
    pipeline_options: ClassVar[dict] = {}  # its constructor's arguments besides the components
    tag: str  # a model card's Hub tag
    file_kinds: ClassVar[dict[str, str]]  # diffusers' names of its single-file architectures -> what messages say
    widths: ClassVar[dict[tuple[int, ...], str]]  # its text encoders' widths -> what messages call such a model

    @classmethod
    def components(cls) -> tuple[str, ...]:
        return ("unet", "vae", *cls.encoders, *cls.tokenizers)

    @classmethod
    def detect(cls, index: dict) -> bool:
        """Whether a model_index.json (or a pipeline's config) has every component of the family."""
        return all(isinstance(index.get(c), list | tuple) and index[c][0] for c in cls.components())

    @staticmethod
    def time_ids(original_size: Size, crop_top_left: Size, target_size: Size) -> list[int] | None:
        """A photo's size conditioning, as the family's pipeline gives the UNet (None: it has none)."""
        return None

    @staticmethod
    def condition(
        text_encoders: list, prompt_ids: list[torch.Tensor], time_ids: torch.Tensor | None, clip_skip: int = 0
    ) -> tuple[torch.Tensor, dict | None]:
        """The UNet's encoder_hidden_states and added conditions, exactly as the pipeline computes them."""
        raise NotImplementedError

    @classmethod
    def embedding_files(cls, rows: list[torch.Tensor], token: str, extension: str, suffix: str = "") -> dict:
        """{file name: tensors}: the diffusers layout, learned_embeds{suffix} for the first text
        encoder's rows, learned_embeds_2{suffix} for the second's."""
        return {embeds_name(extension, suffix, second=i > 0): {token: r} for i, r in enumerate(rows)}

    @staticmethod
    def single_file(token: str) -> str | None:
        """The one file holding every encoder's vectors that A1111 and ComfyUI read, beside the
        diffusers layout (None: the diffusers file is that file)."""
        return None

    @classmethod
    def tool_files(cls, out: Path, token: str, rows: list[torch.Tensor], extension: str) -> list[Path]:
        """Beside the final embedding: the files other tools look for."""
        raise NotImplementedError

    @classmethod
    def card_use(cls, repo_id: str, token: str) -> tuple[str, str]:
        """A model card's diffusers loading code, and its line for other tools."""
        raise NotImplementedError

    @classmethod
    def pipeline(cls, parts: dict, settings: dict | None = None):
        """The family's diffusers pipeline around components already loaded; `settings` are a
        model index's own (SDXL's force_zeros_for_empty_prompt), else the class's defaults."""
        import inspect

        import diffusers

        pipeline_class = getattr(diffusers, cls.pipeline_class)
        accepted = inspect.signature(pipeline_class).parameters
        kept = {k: v for k, v in (settings or {}).items() if k in accepted and not isinstance(v, list | tuple)}
        return pipeline_class(**parts, **{**kept, **cls.pipeline_options})


def family_of_index(index: dict, source: str) -> type[ModelFamily]:
    """The family a model_index.json (or a pipeline's config) describes: the one with the most
    components when several fit (SDXL's hold SD's)."""
    found = [f for f in MODEL_FAMILIES if f.detect(index)]
    if not found:
        parts = ", ".join(k for k in index if not k.startswith("_"))
        names = " or ".join(f.name for f in MODEL_FAMILIES)
        raise UserError(
            f"{source}: {index.get('_class_name', 'this pipeline')} ({parts}) is not a {names} text-to-image pipeline"
        )
    return max(found, key=lambda f: len(f.components()))


def family_of_pipeline(pipe) -> type[ModelFamily]:
    return family_of_index(dict(pipe.config), type(pipe).__name__)


def model_for_widths(widths: Iterable[int]) -> str | None:
    """The models whose text encoders have these widths (None: no known one)."""
    return next((f.widths[tuple(widths)] for f in MODEL_FAMILIES if tuple(widths) in f.widths), None)


class StableDiffusion(ModelFamily):
    """SD 1.x and 2.x: one CLIP text encoder; the UNet attends to its last hidden states."""

    name = "Stable Diffusion 1.x/2.x"
    encoders = ("text_encoder",)
    encoder_classes = ("CLIPTextModel",)
    tokenizers = ("tokenizer",)
    slots = ("clip_l",)
    pipeline_class = "StableDiffusionPipeline"
    pipeline_options: ClassVar = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    tag = "stable-diffusion"
    file_kinds: ClassVar = {"v1": "SD 1.x", "v2": "SD 2.x"}
    widths: ClassVar = {(768,): "SD 1.x", (1024,): "SD 2.x"}

    @staticmethod
    def condition(
        text_encoders: list, prompt_ids: list[torch.Tensor], time_ids: torch.Tensor | None, clip_skip: int = 0
    ) -> tuple[torch.Tensor, dict | None]:
        # As diffusers' pipeline: the output of the layer clip_skip before the last, through the
        # final layer norm the last layer's output passes (clip_skip=0: last_hidden_state itself).
        # The loader makes text_model.final_layer_norm readable in every transformers version.
        encoder = text_encoders[0]
        out = encoder(prompt_ids[0], output_hidden_states=True)
        return encoder.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)]), None

    @classmethod
    def tool_files(cls, out: Path, token: str, rows: list[torch.Tensor], extension: str) -> list[Path]:
        """learned_embeds.bin too, which older loaders look for."""
        return [] if extension == ".bin" else [write_diffusers_embedding(out / embeds_name(".bin"), token, rows[0])]

    @classmethod
    def card_use(cls, repo_id: str, token: str) -> tuple[str, str]:
        load = f'pipe.load_textual_inversion("{repo_id}")'
        return load, "Convert for A1111 or ComfyUI with `python infer.py convert REPO OUT --to a1111`."


class StableDiffusionXL(ModelFamily):
    """SDXL, exactly as its diffusers pipeline conditions at inference: both encoders'
    penultimate hidden states side by side (clip_skip counts back from the penultimate, as the
    pipeline does), the second encoder's pooled projection, and each image's size and crop as
    `time_ids`."""

    name = "Stable Diffusion XL"
    encoders = ("text_encoder", "text_encoder_2")
    encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    tokenizers = ("tokenizer", "tokenizer_2")
    slots = ("clip_l", "clip_g")
    pipeline_class = "StableDiffusionXLPipeline"
    tag = "stable-diffusion-xl"
    file_kinds: ClassVar = {"xl_base": "SDXL"}
    widths: ClassVar = {(768, 1280): "SDXL", (1280,): "SDXL refiner"}

    @staticmethod
    def time_ids(original_size: Size, crop_top_left: Size, target_size: Size) -> list[int] | None:
        return [*original_size, *crop_top_left, *target_size]

    @staticmethod
    def condition(
        text_encoders: list, prompt_ids: list[torch.Tensor], time_ids: torch.Tensor | None, clip_skip: int = 0
    ) -> tuple[torch.Tensor, dict | None]:
        first = text_encoders[0](prompt_ids[0], output_hidden_states=True)
        # Run through the model's own forward so the pooled position is chosen exactly as at
        # inference (with eos_token_id=2 configs transformers pools at the highest token id,
        # which is the placeholder's when the prompt contains it).
        second = text_encoders[1](prompt_ids[1], output_hidden_states=True)
        layer = -(clip_skip + 2)
        hidden = torch.cat([first.hidden_states[layer], second.hidden_states[layer]], dim=-1)
        return hidden, {"text_embeds": second.text_embeds, "time_ids": time_ids}

    @staticmethod
    def single_file(token: str) -> str | None:
        return file_name_for_token(token) + ".safetensors"

    @classmethod
    def tool_files(cls, out: Path, token: str, rows: list[torch.Tensor], extension: str) -> list[Path]:
        """The one clip_l/clip_g file A1111, ComfyUI, kohya and invoke read."""
        return [write_sdxl_embedding(out / cls.single_file(token), rows[0], rows[1])]

    @classmethod
    def card_use(cls, repo_id: str, token: str) -> tuple[str, str]:
        load = (
            f'pipe.load_textual_inversion("{repo_id}", weight_name="learned_embeds.safetensors",\n'
            f"                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)\n"
            f'pipe.load_textual_inversion("{repo_id}", weight_name="learned_embeds_2.safetensors",\n'
            f"                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"
        )
        other = (
            f"`{cls.single_file(token)}` holds both encoders' vectors (`clip_l`, `clip_g`), as A1111 and ComfyUI read."
        )
        return load, other


MODEL_FAMILIES: list[type[ModelFamily]] = [StableDiffusion, StableDiffusionXL]


# ----------------------------------------------------------------------------------------
# Base models in one original-layout file (A1111, ComfyUI, CivitAI): checked from key names
# and shapes alone, then loaded by diffusers' own single-file converters. The trainer loads
# its models through the same functions.

MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
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
    kind: str  # diffusers' name of its architecture (infer_diffusers_model_type)
    description: str  # what messages call that architecture (its family's file_kinds)
    config: str  # a local diffusers folder (or a configs-only snapshot of a Hub repo)
    dtype: torch.dtype  # the precision the UNet is stored in


def is_model_file(name: str | Path) -> bool:
    """A file (or a path to a file not there yet) rather than a folder or a Hub id."""
    path = Path(name).expanduser()
    return path.is_file() or (not path.exists() and str(name).endswith(MODEL_FILE_SUFFIXES))


def tensor_headers(path: Path, source: str) -> dict[str, object]:
    """A checkpoint's entries with every tensor as a meta tensor (name, shape, dtype, no data):
    from the safetensors header, or from a pickle mapped into memory, never reading the weights."""
    if not is_safetensors(path):
        return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in read_tensors(path, source).items()}
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(length)) if 8 + length <= size else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{source}: its safetensors header is unreadable; the file is truncated or corrupt")
    header.pop("__metadata__", None)
    end = 8 + length + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if end > size:
        raise UserError(
            f"{source}: the file is truncated ({size:,} bytes of the {end:,} its header lists); download it again"
        )
    return {
        key: torch.empty(v["shape"], dtype=SAFETENSORS_DTYPES.get(v["dtype"], torch.uint8), device="meta")
        for key, v in header.items()
    }


def model_kind(entries: dict[str, object], source: str) -> tuple[str, type[ModelFamily]]:
    """What the file is, from its key names and shapes: diffusers' name of its architecture and
    its family, or a one-line error naming what it is instead."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    keys = list(entries)
    if any(m in k for k in keys for m in ("hada_w1", "lokr_w1", "lokr_w2", ".oft_", "oft_blocks")):
        raise UserError(
            f"{source}: is a LyCORIS (LoHa/LoKr/OFT) file, not a base model; give the checkpoint it was made for"
        )
    if any(m in k for k in keys for m in ("lora_up.", "lora_down.", "lora_A.", "lora_B.", ".lora.")):
        raise UserError(f"{source}: is a LoRA, not a base model; give the checkpoint it was made for")
    tensors = [v for v in entries.values() if isinstance(v, torch.Tensor)]
    # Embeddings are a few [N, D] tensors under a token or layout name; models' keys are dotted paths.
    few_vectors = 0 < len(keys) <= 4 and len(tensors) == len(keys) and all(t.ndim <= 2 for t in tensors)
    named_like_embedding = "string_to_param" in entries or set(keys) & {"clip_l", "clip_g", *GENERIC_KEYS}
    if named_like_embedding or (few_vectors and not any("." in k for k in keys)):
        raise UserError(
            f"{source}: is a Textual Inversion embedding, not a base model; give the checkpoint it was trained "
            "for (generate with an embedding through infer.py --embedding)"
        )
    try:
        kind = infer_diffusers_model_type(entries)
    except Exception:  # its rules read tensors' values for a few exotic models: not ours either way
        kind = "unknown"
    if "inpaint" in kind:
        raise UserError(
            f"{source}: is an inpainting model (its UNet takes 9 input channels, not 4); give the text-to-image "
            "model it was made from"
        )
    family = next((f for f in MODEL_FAMILIES if kind in f.file_kinds), None)
    if family is None:
        raise UserError(
            f"{source}: is a {kind} checkpoint (as diffusers names it), an architecture this does not handle; "
            "give a Stable Diffusion 1.x, 2.x or SDXL text-to-image model"
        )
    if UNET_PREFIX + "input_blocks.0.0.weight" not in entries:
        if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.")) for k in keys):
            raise UserError(
                f"{source}: is a VAE alone, not a base model; give it as --pretrained_vae_model_name_or_path"
            )
        raise UserError(f"{source}: is not a Stable Diffusion checkpoint (no {UNET_PREFIX}input_blocks UNet weights)")
    for part, prefixes in (("VAE", COMPONENT_PREFIXES["vae"]), ("text encoder", COMPONENT_PREFIXES["text_encoder"])):
        if not any(k.startswith(prefixes) for k in keys):
            raise UserError(f"{source}: holds no {part} weights, only part of a model; give a full checkpoint")
    return kind, family


def model_file_config(entries: dict[str, object], source: str, config: str | None) -> str:
    """A local folder with the configs and tokenizer(s) describing the file: `config` itself, or
    the configs-only part of a Hub repo (`config`, or diffusers' default repo for the file's kind)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download

    if config is not None and Path(config).expanduser().is_dir():
        return str(Path(config).expanduser())
    repo = config or fetch_diffusers_config(entries)["pretrained_model_name_or_path"]
    check_source(repo, "--single_file_config")
    try:
        return snapshot_download(repo, allow_patterns=["*.json", "*.txt"])
    except Exception as e:
        reason = first_line(e)
        given = f"--single_file_config {config}" if config else f"its configs come from {repo}, which"
        raise UserError(
            f"{source}: {given} is not a local folder and the Hub could not provide it ({reason}); pass "
            "--single_file_config with a local diffusers folder of the same architecture"
        ) from None


def inspect_model_file(name: str | Path, config: str | None, flag: str) -> ModelFile:
    """Check an original-layout model file cheaply (key names and shapes, no weights read) and
    find the configs describing it; every problem is a one-line UserError naming the file."""
    path = Path(name).expanduser()
    source = f"{flag} {name}"
    if not path.is_file():
        raise UserError(f"{source}: no such file")
    entries = tensor_headers(path, source)
    kind, family = model_kind(entries, source)
    folder = model_file_config(entries, source, config)

    # The config folder must describe the file: the same family and the same key shapes.
    given = f"--single_file_config {config or folder}"

    def read(part: str) -> dict:
        if not (Path(folder) / part).is_file():
            raise UserError(f"{given}: no {part}; give a diffusers folder")
        return json.loads((Path(folder) / part).read_text())

    described = family_of_index(read("model_index.json"), given)
    if described != family:
        raise UserError(
            f"{given} describes a {described.name} pipeline but {source} is {family.file_kinds[kind]}; give the config "
            "of the model the file was made from"
        )
    unet, vae = read("unet/config.json"), read("vae/config.json")
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
    for sub in family.encoders:
        text = read(f"{sub}/config.json")
        shape = next((tuple(entries[n].shape) for n in embeddings[sub] if n in entries), None)
        compared.append((f"{sub} [vocabulary, width]", shape, (text["vocab_size"], text["hidden_size"])))
    for what, in_file, in_config in compared:
        if in_file != in_config:
            raise UserError(
                f"{given} does not match {source}: {what} is {in_file} in the file "
                f"but {in_config} in the config; give the config of the model the file was made from"
            )
    unet_dtype = entries[UNET_PREFIX + "input_blocks.0.0.weight"].dtype
    return ModelFile(path, source, kind, family.file_kinds[kind], folder, unet_dtype)


def read_tensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    """All the weights of a checkpoint, mapped from the file rather than copied where the
    format allows (safetensors; zip-format pickles), read with the tensors-only unpickler."""
    if is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    data = load_pickle(path, source, mmap=True)
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):  # training code nests them
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"{source}: it holds a {type(data).__name__}, not a model's weights")
    return data


def load_vae(source: str, config: str, dtype: torch.dtype, flag: str):
    """An AutoencoderKL from a diffusers VAE folder or Hub id, or from one VAE file in the
    original layout (its config: `config`'s vae/, the base model's)."""
    from diffusers import AutoencoderKL

    label = f"{flag} {source}"
    try:
        if is_model_file(source):
            path = Path(source).expanduser()
            if not path.is_file():
                raise UserError(f"{label}: no such file")
            if not any(k.endswith("encoder.conv_in.weight") for k in tensor_headers(path, label)):
                raise UserError(f"{label}: not a VAE (no encoder.conv_in weights)")
            return AutoencoderKL.from_single_file(
                read_tensors(path, label), config=config, subfolder="vae", torch_dtype=dtype, local_files_only=True
            )
        subfolder = "vae" if (Path(source).expanduser() / "vae").is_dir() else None
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:  # missing files, shapes that do not fit the config
        raise UserError(f"{label}: cannot load it as this model's VAE ({first_line(e)})") from None


def read_config(root: str, name: str, revision: str | None, flag: str) -> dict:
    """A JSON file of a model (model_index.json, SUB/config.json), from a local folder or the Hub,
    with one-line errors for both."""
    path = Path(root)
    if path.is_dir():
        if not (path / name).exists():
            if name == "model_index.json":
                raise UserError(
                    f"{flag} {root}: no model_index.json, so not a diffusers Stable Diffusion folder (expected "
                    "unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
                )
            raise UserError(f"{flag} {root}: cannot load {Path(name).parent} (no {name})")
        return json.loads((path / name).read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(root, name, revision=revision)).read_text())
    except Exception as e:
        raise UserError(
            f"{flag} {root}: not a local folder, and the Hub could not provide its {name} ({first_line(e)})"
        ) from None


@dataclass
class ModelSource:
    """A base model as its configs describe it, before any weight is read: what flags are
    checked against, and what load_pipeline loads."""

    name: str  # as given: a diffusers folder, a Hub id or an original-layout file
    flag: str  # the flag that named it, for messages
    family: type[ModelFamily]
    root: str  # its configs, tokenizer(s) and scheduler: the folder or Hub id, or the file's config folder
    file: ModelFile | None  # an original-layout file, checked
    revision: str | None  # of a Hub id
    vae_scale: int  # the VAE's downscaling factor
    text_layers: int  # the fewest layers of its text encoders
    index: dict = field(default_factory=dict)  # its model_index.json


def find_model(
    name: str, single_file_config: str | None = None, revision: str | None = None, flag: str = "--model"
) -> ModelSource:
    """The model's family and the shapes flags depend on, from its configs alone; an
    original-layout file is checked from its key names and shapes first (see inspect_model_file)."""
    file = inspect_model_file(name, single_file_config, flag) if is_model_file(name) else None
    folder = Path(name).expanduser()
    root = file.config if file is not None else str(folder) if folder.is_dir() else name
    revision = revision if file is None else None
    index = read_config(root, "model_index.json", revision, flag)
    family = family_of_index(index, f"{flag} {name}")
    vae = read_config(root, "vae/config.json", revision, flag)
    layers = min(
        read_config(root, f"{sub}/config.json", revision, flag)["num_hidden_layers"] for sub in family.encoders
    )
    return ModelSource(
        name, flag, family, root, file, revision, 2 ** (len(vae["block_out_channels"]) - 1), layers, index
    )


def load_pipeline(
    model: str | ModelSource,
    dtype: torch.dtype | dict[str, torch.dtype | None] | None = torch.float32,
    device: str | torch.device = "cpu",
    single_file_config: str | None = None,
    prediction_type: str | None = None,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    *,
    tokenizer: str | None = None,
    whole: bool = False,
):
    """The one model loader (generation, eval, the trainer's models and its full pipeline): the
    family's text-to-image pipeline of a local diffusers folder, a Hub id or an original-layout
    model file (described by `single_file_config`, see inspect_model_file), on `device`.

    `dtype` is one precision for all, or one per component ({"vae": torch.float32, "default":
    torch.float16}); None keeps each library's default (diffusers: fp32; transformers: as
    stored). `prediction_type` overrides the scheduler's; `vae` (a folder, Hub id or VAE file)
    replaces the model's VAE and `tokenizer` its first tokenizer, as the trainer's flags do;
    `revision` and `variant` are diffusers' (folders and Hub ids). `whole` loads the parts no
    image needs too (a safety checker), to save the pipeline as the model has it.
    """
    import diffusers
    import transformers

    source = model if isinstance(model, ModelSource) else find_model(model, single_file_config, revision)
    family, file, root = source.family, source.file, source.root
    dtypes = dtype if isinstance(dtype, dict) else {"default": dtype}

    def dtype_of(part: str) -> torch.dtype | None:
        return dtypes.get(part, dtypes.get("default"))

    def load(what: str, loader: Callable, *args, **kwargs):
        try:
            return loader(*args, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"{source.flag} {source.name}: cannot load {what} ({first_line(e)})") from None

    hub = {} if source.revision is None else {"revision": source.revision}
    weights = {**hub, "variant": variant} if file is None else {}
    if file is not None:
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

        logger.info("%s: %s single file, configs from %s", source.name, file.description, root)
        state = load("its weights", read_tensors, file.path, file.source)
    classes = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}
    classes.update(zip(family.encoders, (getattr(transformers, name) for name in family.encoder_classes)))
    parts = {}
    for sub, cls in classes.items():
        if vae and sub == "vae":
            continue  # the --pretrained_vae_model_name_or_path one, below
        if file is None:
            argument = "dtype" if sub in family.encoders else "torch_dtype"  # transformers' name for it
            precision = {} if dtype_of(sub) is None else {argument: dtype_of(sub)}
            parts[sub] = load(sub, cls.from_pretrained, root, subfolder=sub, **weights, **precision)
            continue
        # diffusers' single-file converters. A component's original tensors are dropped as soon as it
        # is built, so the file's weights and the built modules do not both stay alive in full.
        if sub in family.encoders:
            convert = functools.partial(create_diffusers_clip_model_from_ldm, cls)
        else:
            convert = cls.from_single_file
        try:
            parts[sub] = convert(state, config=root, subfolder=sub, torch_dtype=dtype_of(sub), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:  # e.g. shapes the checks did not compare
            raise UserError(f"{file.source}: cannot load its {sub} ({first_line(e)})") from None
        for key in [k for k in state if k.startswith(COMPONENT_PREFIXES[sub])]:
            del state[key]
    if file is not None:
        del state  # the rest (an overridden VAE's, EMA copies) before anything else is loaded
    if vae:
        parts["vae"] = load_vae(vae, root, dtype_of("vae"), "--pretrained_vae_model_name_or_path")
    tokenizer_class = getattr(transformers, family.tokenizer_class)
    for i, sub in enumerate(family.tokenizers):
        if tokenizer and i == 0:
            parts[sub] = load("--tokenizer_name", tokenizer_class.from_pretrained, tokenizer)
        else:
            parts[sub] = load(sub, tokenizer_class.from_pretrained, root, subfolder=sub, **hub)
    config = load("scheduler", diffusers.DDPMScheduler.load_config, root, subfolder="scheduler", **hub)
    overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
    parts["scheduler"] = getattr(diffusers, config["_class_name"]).from_config(config, **overrides)
    if whole:  # the rest of the model as it is stored (a file's config folder has no safety checker weights)
        rest = (
            {"safety_checker": None, "requires_safety_checker": False}
            if file and "safety_checker" in source.index
            else {}
        )
        pipe = load("it", diffusers.DiffusionPipeline.from_pretrained, root, **parts, **rest, **weights)
    else:
        pipe = family.pipeline(parts, source.index)
    enable_clip_skip(pipe)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(device)
            own_weight_memory(component)
    return pipe


ALIGNMENT = 64  # of the CPU allocator's blocks
MADV_PAGEOUT = 21  # Linux >= 5.4 (elsewhere a file's pages go when its last weight has been copied)
LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def own_weight_memory(module: torch.nn.Module) -> None:
    """On the CPU, copy each weight that sits at a file's byte offset into its own aligned
    allocation, and hand the file's pages under it back at once. Loaders map weights straight
    from their files, and CPU kernels round by alignment, so the same weights from a single file
    and from a diffusers folder would otherwise differ in the last bit; handing the pages back
    weight by weight keeps one copy of the weights in memory, not two. (A GPU copies anyway.)"""
    page = mmap.PAGESIZE
    for parameter in module.parameters():
        if parameter.device.type == "cpu" and parameter.data_ptr() % ALIGNMENT:
            mapped = parameter.data
            parameter.data = mapped.clone()
            # The whole pages under the old copy go back to the kernel. That never loses data: a
            # file's pages are read again, and other pages swapped back in, if touched again.
            start = -(-mapped.data_ptr() // page) * page
            end = (mapped.data_ptr() + mapped.nbytes) // page * page
            if LIBC is not None and mapped.is_contiguous() and end > start:
                LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


def set_scheduler(pipe, name: str) -> None:
    import diffusers

    entry = SCHEDULERS[name]
    if entry is not None:
        cls, extra = entry
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)


def default_guidance_scale(pipe) -> float:
    import inspect

    return inspect.signature(pipe.__call__).parameters["guidance_scale"].default


def image_settings(
    pipe,
    model: str,
    dtype: torch.dtype,
    steps: int,
    args: argparse.Namespace,
    clip_skip: int = 0,
    width: int | None = None,
    height: int | None = None,
    negative_prompt: str | None = None,
) -> dict:
    """What the PNG of each image `pipe` makes records besides its prompt, seed and embeddings,
    with generate's and eval's --scheduler and --guidance_scale (None: the pipeline's) and the
    pipeline's size where none is given; a clip_skip too deep for the text encoders fails here."""
    check_clip_skip(clip_skip, min(encoder.config.num_hidden_layers for _, _, encoder in text_encoder_slots(pipe)))
    default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return {
        "negative_prompt": negative_prompt or "",
        "steps": steps,
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else default_guidance_scale(pipe),
        "scheduler": args.scheduler,
        **a1111_sampler(pipe.scheduler),
        "width": width or default_size,
        "height": height or default_size,
        "model": model,
        "dtype": str(dtype).removeprefix("torch."),
        **({"clip_skip": clip_skip} if clip_skip else {}),  # recorded when used, as A1111 does
    }


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


# A1111's sampler names (its infotext's "Sampler"), by diffusers scheduler class.
A1111_SAMPLERS = {
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSinglestepScheduler": "DPM++ 2S",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}
# The samplers A1111 runs through k-diffusion, where a "Schedule type" applies.
A1111_SCHEDULED = {"DPM++ 2M", "DPM++ 2M SDE", "Euler", "Euler a", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ SDE"}
PNG_SETTINGS_KEY = "textual_inversion"  # the PNG text chunk holding our settings as JSON


def a1111_sampler(scheduler) -> dict[str, str]:
    """{"sampler": A1111's name, "schedule_type": ...} for a diffusers scheduler. The schedule
    type is written because A1111 1.9+ reads a missing one as its sampler's default (Karras for
    DPM++ 2M), while diffusers' samplers space their steps uniformly unless told otherwise."""
    config = scheduler.config
    name = A1111_SAMPLERS.get(type(scheduler).__name__, type(scheduler).__name__)
    if name == "DPM++ 2M" and config.get("algorithm_type") == "sde-dpmsolver++":
        name = "DPM++ 2M SDE"
    found = {"sampler": name}
    if name in A1111_SCHEDULED:
        found["schedule_type"] = "Karras" if config.get("use_karras_sigmas") else "Uniform"
    return found


def _a1111_quote(value: object) -> str:
    # A1111's rule: a value holding a comma, colon or line break is written as a JSON string.
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(settings: dict) -> str:
    """A1111's infotext for our settings dict, as its PNG Info, civitai and other readers parse it:
    the prompt, a "Negative prompt: ..." line when there is one, then one line of "Key: value"
    pairs. Clip skip is A1111's count (ours + 1), written only when used, as A1111 does; each
    embedding is listed in "TI hashes" under its A1111 name with the first 12 hex digits of its
    file's sha256 (A1111's short hash)."""
    seed = settings["seed"] if "seed" in settings else settings["seeds"][0]
    # A grid of several prompts (a validation grid's rows) lists them one per line.
    prompt = settings["prompt"] if "prompt" in settings else "\n".join(settings["prompts"])
    embeddings = [
        f"{e['name'].replace(':', '').replace(',', '')}: {e['hash']}"
        for e in settings.get("embeddings", [])
        if e.get("hash")
    ]
    # A1111's "Model" is a checkpoint file's name without its extension; here also a folder's
    # name, or the repo name of a Hub id.
    model = Path(str(settings["model"]).rstrip("/\\"))
    fields = {
        "Steps": settings["steps"],
        "Sampler": settings["sampler"],
        "Schedule type": settings.get("schedule_type"),
        "CFG scale": settings["guidance_scale"],
        "Seed": seed,
        "Size": f"{settings['width']}x{settings['height']}",
        "Model": model.stem if model.suffix in MODEL_FILE_SUFFIXES else model.name,
        "Clip skip": settings["clip_skip"] + 1 if settings.get("clip_skip") else None,
        "TI hashes": ", ".join(embeddings) or None,
        "Embedding step": settings.get("embedding_step"),
    }
    line = ", ".join(f"{k}: {_a1111_quote(v)}" for k, v in fields.items() if v is not None)
    negative = settings.get("negative_prompt")
    return prompt + (f"\nNegative prompt: {negative}" if negative else "") + "\n" + line


def write_png(path: str | Path, image, settings: dict) -> Path:
    """A PNG carrying its settings twice: as A1111's infotext in the "parameters" chunk (what
    A1111's PNG Info, civitai and most viewers read) and, whole, as JSON in the
    "textual_inversion" chunk (read it back with read_png_settings)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(settings))
    info.add_text(PNG_SETTINGS_KEY, json.dumps(settings))  # ASCII-escaped, so always a plain tEXt chunk
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_settings(path: str | Path) -> dict | None:
    """The settings JSON that write_png stored in a PNG; None for a PNG without it (or not a PNG)."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(PNG_SETTINGS_KEY)
    except OSError:  # not an image at all (UnidentifiedImageError) too
        return None
    try:
        settings = json.loads(text) if text else None
    except ValueError:
        return None
    return settings if isinstance(settings, dict) else None


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """The count and its noun, in the number it needs: "1 photo", "2 photos", "0 photos"."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def _fit_lines(text: str, font, width: float, max_lines: int) -> list[str]:
    """`text` wrapped at spaces to `width` pixels; a word too long for a line, and whatever
    does not fit in `max_lines`, is cut and marked with an ellipsis."""

    def cut(line: str, mark: str = "") -> str:
        while line and font.getlength(line + mark) > width:
            line, mark = line[:-1], "…"
        return line.rstrip() + mark

    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(word)
    lines = [cut(line) for line in lines] or [""]
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], cut(lines[max_lines - 1], "…")]
    return lines


def labelled_grid(rows: list[list], labels: list[str], title: str):
    """Rows of equal-sized images under a title line (the step), each row's label (its prompt)
    to its left, wrapped, black on white. The images fill the bottom-right corner, uncut and
    untouched, so grid_tiles can take them back out."""
    from PIL import ImageDraw, ImageFont

    w, h = rows[0][0].size
    columns = max(len(row) for row in rows)
    size = max(12, min(48, h // 20))  # about 25 px at 512, 48 at 1024, legible at tiny sizes
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: the small fixed bitmap font
        font = ImageFont.load_default()
    margin = size // 2
    ascent, descent = font.getmetrics()
    line_height = round((ascent + descent) * 1.15)
    label_width, title_height = max(w // 2, 12 * size), line_height + 2 * margin
    grid = Image.new("RGB", (label_width + columns * w, title_height + len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((margin, margin), title, fill="black", font=font)
    max_lines = max(1, (h - 2 * margin) // line_height)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = title_height + r * h
        if r:  # a faint rule between two rows' labels
            draw.line((margin, top, label_width - margin, top), fill=(200, 200, 200), width=max(1, size // 12))
        lines = _fit_lines(label, font, label_width - 2 * margin, max_lines)
        y = top + (h - len(lines) * line_height) // 2  # centred on its row
        for k, line in enumerate(lines):
            draw.text((margin, y + k * line_height), line, fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image, (label_width + c * w, top))
    return grid


def grid_tiles(path: str | Path) -> list[list]:
    """The images of a labelled grid written with its settings (a validation grid), row by row:
    one row per prompt, one image per seed, taken from the bottom-right corner."""
    settings = read_png_settings(path)
    if settings is None or "prompts" not in settings:
        raise UserError(f"{path}: not a labelled grid (its PNG holds no prompts and seeds)")
    w, h, columns = settings["width"], settings["height"], len(settings["seeds"])
    with Image.open(path) as png:
        grid = png.convert("RGB")
    left, top = grid.width - columns * w, grid.height - len(settings["prompts"]) * h
    return [
        [grid.crop((left + c * w, top + r * h, left + (c + 1) * w, top + (r + 1) * h)) for c in range(columns)]
        for r in range(len(settings["prompts"]))
    ]


def new_figure(rows: int, columns: int, **options):
    """(figure, axes) for a plot: a bare matplotlib Figure, rendered by Agg when saved, so no
    backend or window is ever chosen, laid out "constrained", which keeps room for legends
    placed outside the axes. None when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib  # noqa: F401  (first: a missing or hidden matplotlib fails here, even with a submodule loaded)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=options.pop("figsize", None), layout="constrained")
    return figure, figure.subplots(rows, columns, **options)


def save_figure(figure, path: Path) -> Path:
    """The figure as a PNG, written atomically."""
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


# A legend beside its axes, to the right: never over the data (the constrained layout makes room).
LEGEND_BESIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1), "borderaxespad": 0, "fontsize": "small"}


def image_grid(images: list, columns: int):
    """The images tiled left to right, top to bottom, `columns` to a row, on white."""
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * w, (k // columns) * h))
    return grid


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
        raise UserError(f"--to {to}: choose one of {', '.join(CONVERT_FORMATS)}")
    emb = src if isinstance(src, Embedding) else read_embedding(src, token)
    if token and emb.token != token:
        emb = replace(emb, token=token)
    if list(emb.vectors) == ["clip_g"]:
        raise UserError(f"{emb.source}: it has clip_g vectors only; no tool reads that alone")
    both = "clip_g" in emb.vectors  # the clip_l + clip_g layouts
    out = Path(out).expanduser()
    folder = out if out.is_dir() or not out.suffix else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    elif not out.parent.is_dir():
        raise UserError(f"{out}: its folder {out.parent} does not exist")
    clip_l = emb.vectors["clip_l"]

    def target(suffixes: tuple[str, ...], name: str) -> Path:
        if folder is not None:
            return folder / f"{name}{suffixes[0]}"
        if out.suffix not in suffixes:
            raise UserError(f"{out}: --to {to} writes {' or '.join(suffixes)} files here; name it so")
        return out

    if to == "diffusers":
        if both and folder is None:
            raise UserError(f"{out}: the diffusers SDXL layout is two files; give a folder")
        written = [write_diffusers_embedding(target((".safetensors", ".bin"), EMBEDS), emb.token, clip_l)]
        if both:
            second = folder / embeds_name(".safetensors", second=True)
            written.append(write_diffusers_embedding(second, emb.token, emb.vectors["clip_g"]))
        if folder is not None:
            written.append(write_text(folder / TOKEN_FILE, emb.token))
        return written
    name = file_name_for_token(emb.token)
    if both:
        return [write_sdxl_embedding(target((".safetensors",), name), clip_l, emb.vectors["clip_g"])]
    if to == "a1111":
        return [write_a1111_embedding(target((".pt",), name), emb.token, clip_l)]
    return [write_kohya_embedding(target((".safetensors",), name), clip_l)]


# ----------------------------------------------------------------------------------------
# Scoring embeddings: CLIP-I, CLIP-T and DINO, as the Textual Inversion and DreamBooth papers
# score them, for every step a training run saved (`infer.py eval`).

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # the papers' CLIP
DEFAULT_DINO_MODEL = "facebook/dino-vits16"  # DreamBooth's DINO
TEMPLATES = Path(__file__).resolve().parent / "templates"
EVAL_PROMPTS = {"object": "dreambench_object.txt", "live": "dreambench_live.txt", "style": "eval_style.txt"}
RUN_FORMAT = "textual-inversion-run/1"
PICK_RULES = ("balanced", "fidelity", "editability")


def _scorer_part(load: Callable, name: str, flag: str, **kwargs):
    try:
        return load(name, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(
            f"{flag} {name}: cannot load it ({first_line(e)}); download it once with `hf download {name}` "
            "(it then loads offline), or give a local folder"
        ) from None


@dataclass
class References:
    """The training photos' features (Scorers.references)."""

    clip: torch.Tensor  # [photos, D] unit-length CLIP image features, float32, CPU
    dino: torch.Tensor  # [photos, D'] unit-length DINO features


class Scorers:
    """The papers' three scores, per generated image (score):

    - clip_t: cos(CLIP image features, CLIP text features of the image's text), the text being its
      prompt with the class word in place of the learned word (editability);
    - clip_i: the mean over the photos of cos(CLIP features of the image, of the photo) (fidelity);
    - dino: the same with DINO features, the CLS token of the last hidden state.
    Every image, generated or photo, goes through the scorer's own image processor as loaded.
    The models run on `device`, in half precision on a GPU.
    """

    batch_size = 32

    def __init__(self, clip_model: str, dino_model: str, device: str | torch.device = "cpu"):
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.clip_processor = _scorer_part(AutoProcessor.from_pretrained, clip_model, "--clip_model")
        self.clip = _scorer_part(CLIPModel.from_pretrained, clip_model, "--clip_model", dtype=self.dtype)
        self.dino_processor = _scorer_part(AutoImageProcessor.from_pretrained, dino_model, "--dino_model")
        self.dino = _scorer_part(AutoModel.from_pretrained, dino_model, "--dino_model", dtype=self.dtype)
        for model in (self.clip, self.dino):
            model.requires_grad_(False).eval().to(self.device)

    @torch.no_grad()
    def features(self, items: list, which: str) -> torch.Tensor:
        """Unit-length features [items, D], float32 on the CPU: of RGB PIL images by "clip" or
        "dino", or of texts by CLIP's text model ("text")."""
        found = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            if which == "text":
                tokens = self.clip_processor.tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
                tokens = tokens.to(self.device)
                out = self.clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            else:
                processor = self.clip_processor.image_processor if which == "clip" else self.dino_processor
                pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
                if which == "clip":
                    out = self.clip.get_image_features(pixel_values=pixels)
                else:
                    out = self.dino(pixel_values=pixels).last_hidden_state[:, 0]
            features = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: an output
            found.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(found)

    def references(self, photos: list) -> References:
        """The photos' features, computed once when many sets of images are scored against them."""
        return References(self.features(photos, "clip"), self.features(photos, "dino"))

    def score(self, images: list, texts: list[str], photos: list | References) -> dict[str, torch.Tensor]:
        """Per image: {"clip_i", "clip_t", "dino"} as float32 [images]; texts[i] is image i's text;
        `photos` are RGB PIL images or their references()."""
        refs = photos if isinstance(photos, References) else self.references(photos)
        clip = self.features(images, "clip")
        unique = list(dict.fromkeys(texts))
        text = self.features(unique, "text")[[unique.index(t) for t in texts]]
        return {
            "clip_i": (clip @ refs.clip.T).mean(dim=1),
            "clip_t": (clip * text).sum(dim=1),
            "dino": (self.features(images, "dino") @ refs.dino.T).mean(dim=1),
        }


def mean_and_error(values: torch.Tensor) -> tuple[float, float | None]:
    """The mean and its standard error (None for one value)."""
    values = values.double()
    if values.numel() < 2:
        return values.mean().item(), None
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def read_photos(folder: str | Path, flag: str) -> list:
    """The training photos as the scorers see them: the images the trainer takes from `folder` (a
    folder or a Hub dataset, see photos_folder), decoded as it decodes them (EXIF-transposed, RGB,
    transparency on white)."""
    folder = photos_folder(folder, flag)
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: no such folder; give the folder of the training photos")
    return [open_rgb(path) for path in list_images(folder, flag=flag, warn=False)]


def read_eval_prompts(spec: str) -> list[str]:
    """Prompt templates, `{}` marking the learned word: a shipped set (object, live, style) or a
    file of one prompt per line (blank lines and # comments skipped)."""
    path = TEMPLATES / EVAL_PROMPTS[spec] if spec in EVAL_PROMPTS else Path(spec).expanduser()
    if not path.is_file():
        raise UserError(
            f"--prompts {spec}: no such file; give object, live, style or a file of prompts with {{}} for the word"
        )
    templates = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if "{}" not in text:
            raise UserError(f"--prompts {path}: line {number} has no {{}} where the learned word goes: {text!r}")
        templates.append(text)
    if not templates:
        raise UserError(f"--prompts {path}: no prompts in it")
    return templates


def eval_seed(template: str, index: int, draw: int | None = None) -> int:
    """The seed of image `index` of a prompt: fixed by the prompt's text and the index, so every
    step is scored on the same starting noise and differences between steps are paired. `draw`
    (eval's --seed) picks another fixed set; None is the set every eval uses by default."""
    key = f"{template}\n{index}" + ("" if draw is None else f"\n{draw}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 2**31


def rows_digest(vectors: dict[str, torch.Tensor]) -> str:
    """A fingerprint of an embedding's rows: files holding the same rows are scored once."""
    digest = hashlib.sha256()
    for slot, rows in vectors.items():  # in slot order
        digest.update(slot.encode())
        digest.update(rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_run_record(folder: Path) -> dict | None:
    """OUTPUT_DIR/run.json as textual_inversion.py writes it (None when there is none)."""
    path = folder / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({first_line(e)}); delete it and pass --model, --train_data_dir") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise UserError(f"{path}: not a run record this infer.py reads (format {RUN_FORMAT} expected)")
    return record


@dataclass
class EvalEntry:
    """One set of rows to score: a step of a run (its files holding the same rows), the
    initializer's rows (step 0), or a file given with --embeddings."""

    label: str  # "step 500", "final", a file name
    folder: str  # its images' folder under eval/
    embedding: Embedding
    step: int | None = None
    files: list[str] = field(default_factory=list)
    baseline: str | None = None  # "initializer" for step 0


def run_entries(folder: Path, record: dict | None) -> list[EvalEntry]:
    """The embeddings a run saved (learned_embeds-steps-N, the final learned_embeds and -last, and
    the finals an earlier --keep_best replaced), one entry per distinct set of rows, in step
    order. The step of each file is run.json's record, else the N of its name; a final file
    whose rows match no step is "final"."""
    saved = (record or {}).get("saved", {})
    by_rows: dict[str, EvalEntry] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        match = RUN_EMBEDS_NAME.fullmatch(path.name)
        if not match or not path.is_file():
            continue
        emb = read_embedding(path)
        step = saved.get(path.name, int(match[1]) if match[1] else None)
        entry = by_rows.setdefault(rows_digest(emb.vectors), EvalEntry("", "", emb))
        if entry.step is None:
            entry.step = step
        entry.files += [f.name for f in emb.files if f.name not in entry.files]
    entries = list(by_rows.values())
    for entry in entries:
        if entry.step is not None:
            entry.label, entry.folder = f"step {entry.step}", f"step-{entry.step}"
        else:
            entry.label = entry.folder = "last" if any(LAST in f for f in entry.files) else "final"
    return sorted(entries, key=lambda e: (e.step is None, e.step or 0, e.label))


def initializer_entry(pipe, record: dict) -> EvalEntry | None:
    """Step 0: the rows the run started from, as the trainer made them (phrase_rows of the
    initializer phrase, or the --initializer_embedding fitted to the model)."""
    token = record["placeholder_token"]
    if record.get("initializer_embedding"):
        source = record["initializer_embedding"]
        emb = read_embedding(source, flag="step 0, the run's --initializer_embedding")
        vectors = fit_to_base(emb, base_widths(pipe))
    elif record.get("initializer_token"):
        source = record["initializer_token"]
        vectors = {
            slot: phrase_rows(
                encoder.get_input_embeddings().weight.detach().cpu(),
                tokenizer.encode(source, add_special_tokens=False),
                record["num_vectors"],
            )
            for slot, tokenizer, encoder in text_encoder_slots(pipe)
        }
    else:
        return None
    emb = Embedding(token=token, vectors=vectors, source=f"{source} (the initializer)", layout="initializer")
    return EvalEntry("step 0", "step-0", emb, step=0, baseline="initializer")


def base_widths(pipe) -> dict[str, int]:
    return {slot: encoder.get_input_embeddings().weight.shape[1] for slot, _, encoder in text_encoder_slots(pipe)}


def put_rows(pipe, emb: Embedding, word: str, installed: dict[str, int]) -> None:
    """Make `word` mean `emb`'s rows in `pipe`: installed the first time, its rows overwritten
    after (every step of a run uses the same tokens, so each step's images differ only by rows)."""
    if word not in installed:
        install_embedding(pipe, replace(emb, token=word, aliases=()))
        installed[word] = emb.num_vectors
        return
    vectors = fit_to_base(emb, base_widths(pipe))
    tokens = vector_tokens(word, emb.num_vectors)
    for slot, tokenizer, encoder in text_encoder_slots(pipe):
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[tokenizer.convert_tokens_to_ids(tokens)] = vectors[slot].to(weight.device, weight.dtype)


def eval_words(entries: list[EvalEntry], tokenizer) -> list[str]:
    """The word each entry is written as: its token; one already taken by an embedding with
    another vector count gets the count appended ("charturner-4v")."""
    counts: dict[str, int] = {}
    words = []
    for entry in entries:
        count = entry.embedding.num_vectors
        word = prompt_form(entry.embedding.token.strip(), tokenizer)
        if counts.setdefault(word, count) != count:
            word = prompt_form(f"{word}-{count}v", tokenizer)
            counts.setdefault(word, count)
        words.append(word)
    return words


def drift(emb: Embedding, initial: Embedding | None) -> tuple[dict, dict | None]:
    """Per slot: the mean norm of the vectors, and their mean cosine to the initializer's."""
    norms = {slot: rows.norm(dim=1).mean().item() for slot, rows in emb.vectors.items()}
    if initial is None or initial.num_vectors != emb.num_vectors or set(initial.vectors) != set(emb.vectors):
        return norms, None
    cosines = {
        slot: torch.nn.functional.cosine_similarity(rows, initial.vectors[slot].float(), dim=1).mean().item()
        for slot, rows in emb.vectors.items()
    }
    return norms, cosines


def pareto_front(lines: list[dict]) -> list[dict]:
    """The lines no other line beats on both CLIP-I and CLIP-T (ties count as not beaten)."""

    def beaten(line: dict) -> bool:
        return any(
            other["clip_i"] >= line["clip_i"]
            and other["clip_t"] >= line["clip_t"]
            and (other["clip_i"] > line["clip_i"] or other["clip_t"] > line["clip_t"])
            for other in lines
        )

    return [line for line in lines if not beaten(line)]


def pick_step(lines: list[dict], rule: str = "balanced") -> dict | None:
    """The recommended line of an eval log, by a documented rule (baselines never count):

    - balanced: among the lines on the Pareto front of (CLIP-I, CLIP-T), the highest sum of the
      two, each scaled to [0, 1] across the lines scored (min -> 0, max -> 1; a score that is
      the same everywhere counts 0);
    - fidelity: the highest CLIP-I; editability: the highest CLIP-T.
    Ties go to the earlier line (the earlier step: less drift from the initializer)."""
    if rule not in PICK_RULES:
        raise UserError(f"--pick {rule}: choose one of {', '.join(PICK_RULES)}")
    scored = _pickable(lines)
    if not scored:
        return None
    candidates = pareto_front(scored) if rule == "balanced" else scored
    return max(candidates, key=_pick_rank(scored, rule))


def _pickable(lines: list[dict]) -> list[dict]:
    return [
        line
        for line in lines
        if not line.get("baseline") and line.get("clip_i") is not None and line.get("clip_t") is not None
    ]


def _pick_rank(scored: list[dict], rule: str) -> Callable[[dict], float]:
    """What the rule maximises, over the lines `scored`."""
    if rule == "fidelity":
        return lambda line: line["clip_i"]
    if rule == "editability":
        return lambda line: line["clip_t"]

    def scaled(key: str) -> Callable[[dict], float]:
        low, high = min(line[key] for line in scored), max(line[key] for line in scored)
        return lambda line: (line[key] - low) / (high - low) if high > low else 0.0

    fidelity, editability = scaled("clip_i"), scaled("clip_t")
    return lambda line: fidelity(line) + editability(line)


# The scores each pick rule reads, and their names in print.
PICK_SCORES = {"balanced": ("clip_i", "clip_t"), "fidelity": ("clip_i",), "editability": ("clip_t",)}
SCORE_NAMES = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO"}


def within_noise_of(lines: list[dict], pick: dict, rule: str = "balanced") -> dict | None:
    """The next best line by the rule, when no score the rule reads tells it from `pick`: on
    each, the difference is under twice its standard error (the root of the two squared errors;
    about 95% confidence). None when the pick stands clear, stands alone, or an error is
    unknown (one image per prompt)."""
    scored = _pickable(lines)
    others = [line for line in scored if line is not pick]
    if not others:
        return None
    runner_up = max(others, key=_pick_rank(scored, rule))
    for key in PICK_SCORES[rule]:
        errors = (pick.get(f"{key}_se"), runner_up.get(f"{key}_se"))
        if None in errors or abs(pick[key] - runner_up[key]) >= 2 * math.hypot(*errors):
            return None
    return runner_up


def pick_text(pick: dict, runner_up: dict | None, rule: str) -> str:
    """The printed pick: its step and files, and the step it is within noise of, if any."""
    text = f"pick ({rule}): {pick['label']}" + (f" ({', '.join(pick['files'])})" if pick.get("files") else "")
    if runner_up is None:
        return text
    scores = "; ".join(
        f"{SCORE_NAMES[key]} {_score_text(pick, key)} vs {_score_text(runner_up, key)}" for key in PICK_SCORES[rule]
    )
    return (
        f"{text}, within noise of {runner_up['label']} ({scores}); "
        "more images per prompt (--num_images_per_prompt) narrow the errors"
    )


def final_files(folder: Path, token: str) -> list[Path]:
    """The run's final embedding files, as the trainer writes them: learned_embeds(_2).safetensors
    and .bin, and the SDXL single file named after the token."""
    names = [embeds_name(ext, second=second) for second in (False, True) for ext in (".safetensors", ".bin")]
    names.append(file_name_for_token(token) + ".safetensors")
    return [folder / name for name in names if (folder / name).is_file()]


def keep_best(folder: Path, entry: EvalEntry, token: str, record: dict | None) -> list[Path]:
    """Rewrite the run's final embedding files from `entry`'s rows through the writers, each
    previous file kept as NAME-before-eval.EXT (only once: a later --keep_best keeps the
    trainer's originals). Every file is written atomically, the copies first, so an interrupted
    --keep_best leaves each file whole, old or new, and running it again finishes it."""
    targets = final_files(folder, token)
    if not targets:
        raise UserError(f"--keep_best: {folder} has no final learned_embeds file to rewrite")
    saved = dict((record or {}).get("saved", {}))  # run.json's steps of the files, the copies' included
    for path in targets:
        before = path.with_name(f"{path.stem}{BEFORE_EVAL}{path.suffix}")
        if not before.exists():
            write_bytes(before, path.read_bytes())
        saved.setdefault(before.name, saved.get(path.name))
        saved[path.name] = entry.step
    vectors = entry.embedding.vectors
    for path in targets:
        if match := EMBEDS_NAME.fullmatch(path.name):
            write_diffusers_embedding(path, token, vectors["clip_g" if match[1] else "clip_l"])
        else:
            write_sdxl_embedding(path, vectors["clip_l"], vectors["clip_g"])
    if record is not None:
        write_text(folder / RUN_RECORD, json.dumps({**record, "saved": saved}, indent=1) + "\n")
    return targets


def plot_eval(lines: list[dict], path: Path, pick: dict | None) -> bool:
    """eval.png: the three scores against step (real images dashed), and CLIP-I against CLIP-T
    with each point labelled by its step, as the Textual Inversion paper's Figure 10a; one legend
    for both, below them. False when matplotlib is not installed (it is optional)."""
    made = new_figure(1, 2, figsize=(12, 5.6))
    if made is None:
        return False
    figure, (left, right) = made
    scored = [line for line in lines if line.get("baseline") != "real images"]
    real = next((line for line in lines if line.get("baseline") == "real images"), None)
    numeric = all(line["step"] is not None for line in scored)
    xs = [line["step"] for line in scored] if numeric else list(range(len(scored)))
    # CLIP-T lives near 0.25-0.35 and CLIP-I, DINO near 0.5-0.9: CLIP-T gets its own axis, on the right.
    text_axis = left.twinx()
    for axis, key, color, name in (
        (left, "clip_i", "tab:blue", "CLIP-I"),
        (left, "dino", "tab:green", "DINO"),
        (text_axis, "clip_t", "tab:orange", "CLIP-T (right axis)"),
    ):
        errors = [line.get(f"{key}_se") or 0.0 for line in scored]
        axis.errorbar(xs, [line[key] for line in scored], yerr=errors, marker="o", capsize=3, color=color, label=name)
        if real is not None and real.get(key) is not None:
            axis.axhline(
                real[key], color=color, linestyle="--", linewidth=1, label=f"{name}: the photos among themselves"
            )
    if not numeric:
        left.set_xticks(xs, [line["label"] for line in scored], rotation=30, ha="right")
    left.set_xlabel("step")
    left.set_ylabel("CLIP-I, DINO (mean ± standard error)")
    text_axis.set_ylabel("CLIP-T", color="tab:orange")
    right.errorbar(
        [line["clip_t"] for line in scored],
        [line["clip_i"] for line in scored],
        xerr=[line.get("clip_t_se") or 0.0 for line in scored],
        yerr=[line.get("clip_i_se") or 0.0 for line in scored],
        fmt="o-",
        color="tab:purple",
        alpha=0.7,
        capsize=2,
    )
    for line in scored:
        right.annotate(
            line["label"].removeprefix("step "),
            (line["clip_t"], line["clip_i"]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize="small",
        )
    if pick is not None:
        right.scatter(
            [pick["clip_t"]],
            [pick["clip_i"]],
            s=250,
            marker="*",
            color="gold",
            edgecolor="black",
            zorder=3,
            label=f"pick: {pick['label']}",
        )
    right.set_xlabel("CLIP-T: image vs prompt (editability)")
    right.set_ylabel("CLIP-I: image vs photos (fidelity)")
    handles = [h for axis in (left, text_axis, right) for h in axis.get_legend_handles_labels()[0]]
    figure.legend(handles=handles, loc="outside lower center", ncols=4, fontsize="small")
    save_figure(figure, path)
    return True


def _score_text(line: dict, key: str) -> str:
    if line.get(key) is None:
        return "-"
    error = line.get(f"{key}_se")
    return f"{line[key]:.3f}" + (f" ± {error:.3f}" if error is not None else "")


def eval_table(lines: list[dict], pick: dict | None, rule: str) -> str:
    """The printed table: one row per step (and baseline), the pick marked."""

    def slots_text(values: dict | None) -> str:
        return "/".join(f"{v:.3f}" for v in values.values()) if values else "-"

    rows = [("", *SCORE_NAMES.values(), "norm", "cos to init")]
    for line in lines:
        mark = f"  <- pick ({rule})" if line is pick else ""
        rows.append(
            (
                line["label"],
                *(_score_text(line, key) for key in SCORE_NAMES),
                slots_text(line.get("norm")),
                slots_text(line.get("cos_to_initializer")) + mark,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5] for row in rows)


def _same_image(found: dict | None, wanted: dict) -> bool:
    # Where the rows came from ("embeddings") does not change the image.
    return found is not None and {**found, "embeddings": None} == {**wanted, "embeddings": None}


@dataclass
class EvalInputs:
    """What `infer.py eval` was given, resolved and checked before any model is loaded."""

    run: Path | None  # the training run's OUTPUT_DIR; None when only --embeddings files are scored
    record: dict | None  # its run.json, when it has one
    from_run: list[EvalEntry]  # the run's saved steps: --keep_best picks among these only
    entries: list[EvalEntry]  # from_run, then the --embeddings files
    model: str
    photos: list  # the training photos, as the scorers see them
    prompts: str  # --prompts: object, live, style or a file of prompts
    templates: list[str]
    class_word: str
    out: Path  # where eval/, eval.jsonl and eval.png go


def read_eval_inputs(args: argparse.Namespace) -> EvalInputs:
    """Check the flags and read the run folder, its run.json, the embeddings, the photos and the
    prompts: everything that can fail on the user's input fails here, before a model is loaded."""
    for flag, value in (
        ("--num_images_per_prompt", args.num_images_per_prompt),
        ("--num_inference_steps", args.num_inference_steps),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    check_pixels("--resolution", args.resolution)
    if args.output_dir is None and not args.embeddings:
        raise UserError("give a training run's OUTPUT_DIR, or embedding files with --embeddings")
    run = Path(args.output_dir).expanduser() if args.output_dir else None
    if run is not None and not run.is_dir():
        raise UserError(f"{run}: no such folder; give the --output_dir of a training run")
    record = read_run_record(run) if run is not None else None
    known = record or {}
    if args.keep_best and run is None:
        raise UserError("--keep_best rewrites a training run's files; give its OUTPUT_DIR")

    from_run = run_entries(run, record) if run is not None else []
    entries = list(from_run)
    if run is not None and not entries:
        raise UserError(
            f"{run}: no saved embeddings to score (learned_embeds-steps-N.* or learned_embeds.*); save them while "
            "training with --save_steps N, or give files with --embeddings"
        )
    # Each --embeddings file gets an images folder named after it, numbered when the name is taken.
    folders = {entry.folder for entry in entries}
    for src in args.embeddings:
        emb = read_embedding(src)
        name = base = file_name_for_token(Path(src).name)
        for i in itertools.count(2):
            if name not in folders:
                break
            name = f"{base}-{i}"
        folders.add(name)
        entries.append(EvalEntry(Path(src).name, name, emb, files=[str(src)]))
    model = args.model or known.get("model")
    if not model:
        why = f"{run} has no {RUN_RECORD} (textual_inversion.py writes one) to say" if run else "say"
        raise UserError(f"--model is needed: {why} which base model to generate with")
    photos_dir = args.train_data_dir or known.get("train_data_dir")
    if not photos_dir:
        raise UserError("--train_data_dir is needed: the training photos the images are compared with")
    flag = "--train_data_dir" if args.train_data_dir else f"{run / RUN_RECORD}: train_data_dir"
    photos = read_photos(photos_dir, flag)
    prompts = args.prompts or ("style" if known.get("learnable_property") == "style" else "object")
    templates = read_eval_prompts(prompts)
    class_word = args.class_word or known.get("class_word") or known.get("initializer_token")
    if not class_word:
        why = (
            "the run started from --initializer_embedding, so there is no initializer phrase to stand in"
            if known.get("initializer_embedding")
            else "the word scored in place of the learned one"
        )
        raise UserError(f"--class_word is needed: {why} (e.g. toy, dog, watercolor)")
    out = Path(args.out).expanduser() if args.out else (run if run is not None else Path("outputs"))
    check_source(model, "--model" if args.model else f"{run / RUN_RECORD}: model")
    check_source(args.clip_model, "--clip_model")
    check_source(args.dino_model, "--dino_model")
    return EvalInputs(run, record, from_run, entries, model, photos, prompts, templates, class_word, out)


@dataclass
class EvalSetup:
    """The models eval runs and what every image is made with (load_eval_models)."""

    scorers: Scorers
    pipe: object  # the diffusers pipeline to generate with
    initial: EvalEntry | None  # step 0, the rows the run started from (None without a run record)
    entries: list[EvalEntry]  # what is scored: the inputs' entries, step 0 first unless one holds its rows
    words: list[str]  # the word each entry is written as in its prompts
    png_settings: dict  # the settings every image's PNG records (each adds its prompt, seed and rows)


def load_eval_models(args: argparse.Namespace, inputs: EvalInputs, shared: EvalSetup | None = None) -> EvalSetup:
    """Load the scorers and the pipeline (or take `shared`'s: another concept of the same run, on
    the same base model), add step 0 and settle the generation settings; an embedding or a
    --clip_skip that does not fit the model fails here, before any image is made."""
    known = inputs.record or {}  # the run's settings, which the flags default to
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if shared is not None:
        scorers, pipe = shared.scorers, shared.pipe
    else:
        print(f"loading the scorers {args.clip_model} and {args.dino_model}", file=sys.stderr)
        scorers = Scorers(args.clip_model, args.dino_model, device)
        # The pipeline the run trained with, exactly (its file config, VAE, prediction type), unless
        # --model names another one.
        trained = known if args.model is None else {}
        print(f"loading {inputs.model} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
        pipe = load_pipeline(
            inputs.model,
            dtype,
            device,
            args.single_file_config or trained.get("single_file_config"),
            args.prediction_type or trained.get("prediction_type"),
            vae=trained.get("vae"),  # the run's --pretrained_vae_model_name_or_path
            revision=trained.get("revision"),
            variant=trained.get("variant"),
        )
        set_scheduler(pipe, args.scheduler)
    entries = list(inputs.entries)
    initial = initializer_entry(pipe, inputs.record) if inputs.record is not None else None
    if initial is not None and all(
        rows_digest(e.embedding.vectors) != rows_digest(initial.embedding.vectors) for e in entries
    ):
        entries.insert(0, initial)
    for entry in entries:
        fit_to_base(entry.embedding, base_widths(pipe))  # a width that does not fit fails before any image
    clip_skip = args.clip_skip if args.clip_skip is not None else known.get("clip_skip") or 0
    size = args.resolution or known.get("resolution")
    png_settings = image_settings(pipe, inputs.model, dtype, args.num_inference_steps, args, clip_skip, size, size)
    return EvalSetup(scorers, pipe, initial, entries, eval_words(entries, text_encoder_slots(pipe)[0][1]), png_settings)


PlannedImage = tuple[Path, dict, bool]  # where its PNG goes, its settings, whether that PNG is made already


def plan_eval_images(args: argparse.Namespace, inputs: EvalInputs, setup: EvalSetup) -> list[list[PlannedImage]]:
    """Every image of every entry (one list per entry of setup.entries, in order): each is reused
    when a PNG with its exact settings is already there."""
    plan = []
    for entry, word in zip(setup.entries, setup.words):
        rows = rows_digest(entry.embedding.vectors)
        images = []
        for p, template in enumerate(inputs.templates):
            for k in range(args.num_images_per_prompt):
                image_settings = {
                    "prompt": template.replace("{}", word),
                    **setup.png_settings,
                    "seed": eval_seed(template, k, args.seed),
                    "embeddings": [embedding_record(word, entry.embedding)],
                    "eval": {"template": template, "image": k, "rows": rows},
                }
                path = inputs.out / "eval" / entry.folder / f"{p:02d}-{k:02d}.png"
                images.append((path, image_settings, _same_image(read_png_settings(path), image_settings)))
        plan.append(images)
    return plan


def print_eval_plan(args: argparse.Namespace, inputs: EvalInputs, setup: EvalSetup, reused: int, total: int) -> None:
    """The line saying what is about to be scored, and how."""
    labels = ", ".join(entry.label for entry in setup.entries)
    png = setup.png_settings
    print(
        f"scoring {plural(len(setup.entries), 'embedding')} ({labels}) on {plural(len(inputs.templates), 'prompt')} "
        f"({inputs.prompts}) x {plural(args.num_images_per_prompt, 'image')}, class word {inputs.class_word!r}; "
        f"{args.scheduler} ({png['sampler']}), {plural(args.num_inference_steps, 'step')}, guidance "
        f"{png['guidance_scale']}, {png['width']}x{png['height']} px"
        + (f", clip skip {png['clip_skip']}" if "clip_skip" in png else "")
        + (f"; reusing {reused} of {plural(total, 'image')} already made" if reused else ""),
        file=sys.stderr,
    )


def eval_line_settings(args: argparse.Namespace, inputs: EvalInputs, setup: EvalSetup) -> dict:
    """The "settings" of every eval.jsonl line: what its scores were measured with."""
    png = setup.png_settings
    return {
        "model": inputs.model,
        "scheduler": args.scheduler,
        "sampler": png["sampler"],
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": png["guidance_scale"],
        "resolution": png["width"],
        "clip_skip": png.get("clip_skip", 0),
        "num_images_per_prompt": args.num_images_per_prompt,
        "prompts": inputs.prompts,
        "num_prompts": len(inputs.templates),
        "class_word": inputs.class_word,
        "clip_model": args.clip_model,
        "dino_model": args.dino_model,
        "dtype": png["dtype"],
        "photos": len(inputs.photos),
        **({"seed": args.seed} if args.seed is not None else {}),  # another image set than the default one
    }


def real_images_line(refs: References, line_settings: dict) -> dict | None:
    """The "real images" baseline line of eval.jsonl, DreamBooth's ceiling for CLIP-I and DINO:
    each photo's mean similarity to the other photos (they have no prompt: no CLIP-T). None with
    fewer than two photos."""
    count = refs.clip.shape[0]
    if count < 2:
        return None
    line = {"label": "real images", "step": None, "baseline": "real images", "images": count}
    for key, features in (("clip_i", refs.clip), ("clip_t", None), ("dino", refs.dino)):
        line[key] = line[f"{key}_se"] = None
        if features is not None:
            similarity = features @ features.T
            others = (similarity.sum(dim=1) - similarity.diagonal()) / (count - 1)
            line[key], line[f"{key}_se"] = mean_and_error(others)
    return {**line, "settings": line_settings}


def score_eval_images(
    args: argparse.Namespace, inputs: EvalInputs, setup: EvalSetup
) -> tuple[list[dict], list[tuple[EvalEntry, dict]]]:
    """Make the planned images (plan_eval_images) not made yet and score every entry, writing
    eval.jsonl as it goes. Returns eval.jsonl's lines (the "real images" baseline first, when
    there is one) and each entry with its line."""
    from tqdm.auto import tqdm

    plan = plan_eval_images(args, inputs, setup)
    reused = sum(done for images in plan for *_, done in images)
    total = sum(len(images) for images in plan)
    print_eval_plan(args, inputs, setup, reused, total)
    refs = setup.scorers.references(inputs.photos)
    line_settings = eval_line_settings(args, inputs, setup)
    real = real_images_line(refs, line_settings)
    lines = [real] if real is not None else []
    if inputs.prompts == "style":
        print("note: DINO measures object identity, not style; read CLIP-I and CLIP-T for a style", file=sys.stderr)
    installed: dict[str, int] = {}
    scored: list[tuple[EvalEntry, dict]] = []
    log = inputs.out / "eval.jsonl"
    inputs.out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=total, initial=reused, desc="Eval images", unit="image", dynamic_ncols=True) as bar:
        for entry, word, images in zip(setup.entries, setup.words, plan):
            if not all(done for *_, done in images):
                put_rows(setup.pipe, entry.embedding, word, installed)
                (inputs.out / "eval" / entry.folder).mkdir(parents=True, exist_ok=True)
            for path, image_settings, done in images:
                if done:
                    continue
                (image,) = generate(
                    setup.pipe,
                    image_settings["prompt"],
                    seeds=[image_settings["seed"]],
                    steps=args.num_inference_steps,
                    guidance_scale=image_settings["guidance_scale"],
                    height=image_settings["height"],
                    width=image_settings["width"],
                    clip_skip=image_settings.get("clip_skip", 0),
                )
                write_png(path, image, image_settings)
                bar.update(1)
            line = score_entry(setup.scorers, refs, entry, images, inputs.class_word, setup.initial, line_settings)
            lines.append(line)
            scored.append((entry, line))
            # eval.jsonl rewritten after every entry: an interrupted eval keeps what it scored
            write_text(log, "".join(json.dumps(line) + "\n" for line in lines))
    return lines, scored


def report_eval(
    args: argparse.Namespace, inputs: EvalInputs, lines: list[dict], scored: list[tuple[EvalEntry, dict]]
) -> dict | None:
    """Pick a step (marked in eval.jsonl), print the table and the pick, plot eval.png, and with
    --keep_best make the pick the run's final embedding. Returns the pick's line."""
    pick = pick_step(lines, args.pick)
    if pick is not None:
        pick.update(pick=True, pick_rule=args.pick)
    log = inputs.out / "eval.jsonl"
    write_text(log, "".join(json.dumps(line) + "\n" for line in lines))
    print(eval_table(lines, pick, args.pick))
    plot = inputs.out / "eval.png"
    plotted = plot_eval(lines, plot, pick)
    print(f"wrote {log}" + (f" and {plot}" if plotted else " (eval.png needs matplotlib)"), file=sys.stderr)
    if pick is not None:
        print(pick_text(pick, within_noise_of(lines, pick, args.pick), args.pick))
    if args.keep_best and pick is not None:
        chosen = next(entry for entry, line in scored if line is pick)
        keep_pick(inputs, chosen, pick["label"])
    return pick


def keep_pick(inputs: EvalInputs, chosen: EvalEntry, label: str) -> None:
    """--keep_best: rewrite the run's final embedding files from the picked step, unless they
    hold its rows already."""
    if not any(chosen is entry for entry in inputs.from_run):
        raise UserError(f"--keep_best: the pick, {label}, is not one of the run's saved steps")
    token = (inputs.record or {}).get("placeholder_token") or chosen.embedding.token
    current = [read_embedding(f) for f in final_files(inputs.run, token) if f.stem == EMBEDS]
    wanted = rows_digest(chosen.embedding.vectors)
    if current and all(rows_digest(emb.vectors) == wanted for emb in current):
        print(f"--keep_best: learned_embeds already holds {label}; nothing rewritten", file=sys.stderr)
        return
    # Never while a run trains into the folder: for a concept of a run of several, the run's folder.
    run = inputs.run.resolve()
    top = run.parent if run in concept_folders(run.parent) else inputs.run
    with OutputLock(top, flag="OUTPUT_DIR"):
        rewritten = keep_best(inputs.run, chosen, token, inputs.record)
    for path in rewritten:
        print(
            f"--keep_best: {path} now holds {label} (the previous one: {path.stem}-before-eval{path.suffix})",
            file=sys.stderr,
        )


def run_eval(args: argparse.Namespace) -> list[dict]:
    """`infer.py eval`: generate (or reuse) the images of every entry, score them, write
    eval.jsonl and eval.png, print the table and the pick; return eval.jsonl's lines.

    On a run of several concepts each concept is scored as `infer.py eval OUTPUT_DIR/<name>`
    scores it (its own photos, prompts, class word and pick, its eval files in its folder, or in
    OUT/<name> with --out), the scorers and the base model loaded once; one summary line per
    concept at the end, and every concept's lines returned, in order."""
    run = Path(args.output_dir).expanduser() if args.output_dir else None
    concepts = present_concepts(run) if run is not None and run.is_dir() else []
    # The user's input is all checked before a model loads.
    each = concepts_eval_inputs(args, run, concepts) if concepts else [read_eval_inputs(args)]
    setup, every_line, summary = None, [], []
    for number, inputs in enumerate(each, 1):
        if concepts:
            print(f"\n{inputs.run.name} ({number} of {len(each)}): {inputs.run}")
        setup = load_eval_models(args, inputs, shared=setup)
        lines, scored = score_eval_images(args, inputs, setup)
        pick = report_eval(args, inputs, lines, scored)
        every_line += lines
        scores = ", ".join(f"{SCORE_NAMES[key]} {_score_text(pick, key)}" for key in SCORE_NAMES) if pick else ""
        named = f"{pick['label']} ({scores})" if pick else "no step to pick"
        summary.append(f"{inputs.run and inputs.run.name}: {named}; {inputs.out / 'eval.jsonl'}")
    if concepts:
        print(f"\npicks ({args.pick}), one per concept:\n" + "\n".join(summary))
    return every_line


def concepts_eval_inputs(args: argparse.Namespace, run: Path, concepts: list[Path]) -> list[EvalInputs]:
    """Each concept's EvalInputs, read as for `infer.py eval OUTPUT_DIR/<name>`; flags that belong
    to one concept are refused."""
    for flag, given in (
        ("--train_data_dir", args.train_data_dir),
        ("--class_word", args.class_word),
        ("--embeddings", args.embeddings),
    ):
        if given:
            raise UserError(
                f"{flag} belongs to one concept, and {run} is a run of {plural(len(concepts), 'concept')} "
                f"({', '.join(c.name for c in concepts)}); point eval at that concept's folder, e.g. "
                f"infer.py eval {concepts[0]} {flag} ..."
            )
    each = []
    for folder in concepts:
        if not (folder / RUN_RECORD).is_file():
            raise UserError(
                f"{folder}: no {RUN_RECORD}; score it on its own: infer.py eval {folder} --train_data_dir ..."
            )
        out = str(Path(args.out) / folder.name) if args.out else None
        each.append(read_eval_inputs(argparse.Namespace(**{**vars(args), "output_dir": str(folder), "out": out})))
    return each


def score_entry(
    scorers: Scorers,
    refs: References,
    entry: EvalEntry,
    images: list,
    class_word: str,
    initial: EvalEntry | None,
    common: dict,
) -> dict:
    """One eval.jsonl line: the entry's scores (mean and standard error over its images, each
    image's CLIP-I and DINO averaged over the photos), per-prompt means, norm and drift."""
    from PIL import Image

    pictures = []
    for path, _, _ in images:
        with Image.open(path) as image:
            pictures.append(image.convert("RGB"))
    templates = [image_settings["eval"]["template"] for _, image_settings, _ in images]
    scores = scorers.score(pictures, [template.replace("{}", class_word) for template in templates], refs)
    line = {
        "label": entry.label,
        "step": entry.step,
        "baseline": entry.baseline,
        "files": entry.files,
        "images": len(pictures),
    }
    for key in ("clip_i", "clip_t", "dino"):
        line[key], line[f"{key}_se"] = mean_and_error(scores[key])
    norm, cosine = drift(entry.embedding, initial.embedding if initial is not None else None)
    line.update(norm=norm, cos_to_initializer=cosine)
    line["per_prompt"] = [
        {
            "prompt": template,
            **{
                key: scores[key][[t == template for t in templates]].double().mean().item()
                for key in ("clip_i", "clip_t", "dino")
            },
        }
        for template in dict.fromkeys(templates)
    ]
    line["settings"] = common
    return line


# ----------------------------------------------------------------------------------------
# Command line.


def add_model_file_flags(parser) -> None:
    """--single_file_config and --prediction_type, as this command line and the trainer's take them."""
    parser.add_argument(
        "--single_file_config",
        metavar="DIR_OR_HUB_ID",
        help="For a single-file model: the diffusers folder or Hub repo whose configs and tokenizer(s) describe "
        "it. Default: diffusers' usual repo for the file's architecture (needs the Hub once).",
    )
    parser.add_argument(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        help="Override the scheduler's prediction type (SD 2.x 768-v files: v_prediction; 512 ones: epsilon).",
    )


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """How images are made, and where: the same flags for generating and for eval."""
    p.add_argument("--guidance_scale", type=float, help="Default: the pipeline's (7.5 SD, 5.0 SDXL).")
    p.add_argument(
        "--scheduler",
        default="dpm++",
        choices=list(SCHEDULERS),
        help="Sampler (default dpm++, i.e. DPM-Solver++ 2M); 'default' keeps the model's own.",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: fp16 on CUDA, else fp32.")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a device name.")


def build_generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py",
        description="Generate images with Textual Inversion embeddings from any tool. "
        "(Also: 'infer.py convert SRC OUT --to diffusers|a1111|kohya', 'infer.py eval OUTPUT_DIR' to score "
        "every step a training run saved, and 'infer.py tryout' to try it all offline.)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="Base model (SD 1.x, 2.x or SDXL): a diffusers folder, a Hub id, or one .safetensors/.ckpt file "
        "as A1111 and ComfyUI use.",
    )
    add_model_file_flags(p)
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
    p.add_argument("--negative_prompt", help="What to steer away from; may use a loaded token.")
    p.add_argument("--num_images", type=int, default=1, help="Images to make (default 1).")
    p.add_argument("--seed", type=int, help="Image k uses seed+k. Default: a random seed (printed).")
    p.add_argument("--steps", type=int, default=30, help="Denoising steps (default 30).")
    add_sampling_flags(p)
    p.add_argument(
        "--clip_skip",
        type=int,
        default=0,
        help="CLIP layers to skip, as diffusers' clip_skip (1: the penultimate layer, A1111's 'Clip skip: 2'). "
        "Use the embedding's training value. Default 0: off.",
    )
    p.add_argument("--height", type=int, help="Pixels, a multiple of 8. Default: the model's size.")
    p.add_argument("--width", type=int, help="Pixels, a multiple of 8. Default: the model's size.")
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
    p.add_argument("--token", help="Rename the embedding.")
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py eval",
        description="Score every embedding a training run saved (or any embedding files) as the Textual Inversion "
        "and DreamBooth papers do: CLIP-I (fidelity to the photos), CLIP-T (the prompt is followed) and DINO, "
        "per step, with step 0 (the initializer) and the photos among themselves as baselines. Writes "
        "eval/step-N/*.png, eval.jsonl and eval.png, prints a table and recommends a step.",
    )
    p.add_argument("output_dir", nargs="?", metavar="OUTPUT_DIR", help="A textual_inversion.py run's --output_dir.")
    p.add_argument(
        "--embeddings",
        nargs="+",
        default=[],
        metavar="FILE",
        help="Embedding files (anything infer.py reads) to score too, or instead.",
    )
    p.add_argument("--model", help="Base model. Default: the one the run trained on (run.json).")
    add_model_file_flags(p)
    p.add_argument("--train_data_dir", help="The training photos. Default: the run's.")
    p.add_argument(
        "--prompts",
        help="object (DreamBench's 25 object prompts), live (its 25 live-subject prompts), style (a small set for "
        "styles), or a file of prompts with {} for the learned word. Default: style for style runs, else object.",
    )
    p.add_argument(
        "--class_word",
        help="The word CLIP-T reads in place of the learned one. Default: the run's --class_word, else its "
        "initializer phrase.",
    )
    p.add_argument("--num_images_per_prompt", type=int, default=4, help="Images per prompt and step (default 4).")
    p.add_argument("--num_inference_steps", type=int, default=30, help="Denoising steps (default 30).")
    p.add_argument(
        "--seed",
        type=int,
        help="Draw another set of images (the same for every step). Default: the fixed set every eval uses, so "
        "scores are comparable between runs.",
    )
    add_sampling_flags(p)  # the same for every step
    p.add_argument("--resolution", type=int, help="Image size in pixels. Default: the run's --resolution.")
    p.add_argument("--clip_skip", type=int, help="Default: the run's --clip_skip (0 for --embeddings files).")
    p.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP for CLIP-I and CLIP-T (default %(default)s).")
    p.add_argument(
        "--dino_model", default=DEFAULT_DINO_MODEL, help="Self-supervised ViT for DINO (default %(default)s)."
    )
    p.add_argument(
        "--pick",
        default="balanced",
        choices=PICK_RULES,
        help="balanced: on the CLIP-I/CLIP-T Pareto front, the highest sum of the two scaled to [0, 1]; fidelity: "
        "the highest CLIP-I; editability: the highest CLIP-T.",
    )
    p.add_argument(
        "--keep_best",
        action="store_true",
        help="Rewrite the run's final embedding files from the picked step (previous ones kept as *-before-eval.*).",
    )
    p.add_argument("--out", help="Where eval/, eval.jsonl and eval.png go. Default: OUTPUT_DIR (else ./outputs).")
    return p


def run_generate(args: argparse.Namespace) -> list[Path]:
    from tqdm.auto import tqdm

    for flag, value, low in (
        ("--num_images", args.num_images, 1),
        ("--steps", args.steps, 1),
        ("--clip_skip", args.clip_skip, 0),
    ):
        if value < low:
            raise UserError(f"{flag} must be at least {low} (got {value})")
    check_pixels("--height", args.height)
    check_pixels("--width", args.width)
    if len(args.token) > len(args.embedding):
        raise UserError(
            f"{len(args.token)} --token given for {len(args.embedding)} --embedding; "
            "each --token renames the --embedding in the same position"
        )
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder")
    check_source(args.model, "--model")

    # Read every embedding before loading the model: a bad file fails in a second, not a minute.
    renames = args.token + [""] * (len(args.embedding) - len(args.token))
    embeddings = [emb for src, token in zip(args.embedding, renames) for emb in read_embeddings(src, token or None)]
    print(f"loading {args.model} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    pipe = load_pipeline(args.model, dtype, device, args.single_file_config, args.prediction_type)
    set_scheduler(pipe, args.scheduler)
    settings = image_settings(
        pipe, args.model, dtype, args.steps, args, args.clip_skip, args.width, args.height, args.negative_prompt
    )
    triggers = []
    for emb in embeddings:
        tokens = load_embedding(pipe, emb)
        triggers.append(tokens[0])
        also = [a for a, t in getattr(pipe, ALIASES, {}).items() if t == tokens[0]]
        print(
            f"loaded {tokens[0]} ({plural(emb.num_vectors, 'vector')}, "
            f"{emb.layout}) from {emb.source}" + (f"; also answers to {', '.join(also)}" if also else ""),
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
    with tqdm(total=args.num_images * args.steps, desc="Denoising", unit="step", dynamic_ncols=True) as bar:
        images = generate(
            pipe,
            args.prompt,
            seeds=seeds,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance_scale=settings["guidance_scale"],
            height=settings["height"],
            width=settings["width"],
            clip_skip=args.clip_skip,
            on_step=lambda: bar.update(1),
        )
    embedded = [embedding_record(t, e) for t, e in zip(triggers, embeddings)]
    parameters = {"prompt": args.prompt, **settings, "embeddings": embedded}
    out.mkdir(parents=True, exist_ok=True)
    # Images are numbered on from the highest number already in `out` (a numbered grid's too),
    # never overwritten.
    numbers = [int(m[1]) for p in out.glob("*.png") if (m := re.match(r"(?:grid-)?(\d{5,})[-.]", p.name))]
    first = max(numbers, default=-1) + 1
    written = [
        write_png(out / f"{first + k:05d}-{s}.png", image, {**parameters, "seed": s})
        for k, (s, image) in enumerate(zip(seeds, images))
    ]
    grid = image_grid(images, math.ceil(math.sqrt(len(images))))  # near-square, in seed order
    # grid.png, or, when a run before wrote one there, grid-N.png with N the number of this run's
    # first image: grids are never overwritten either.
    grid_file = out / "grid.png"
    if grid_file.exists():
        grid_file = out / f"grid-{first:05d}.png"
    written.append(write_png(grid_file, grid, {**parameters, "seeds": seeds}))
    return written


TRYOUT_FOLDER = Path("runs")  # git-ignored: the tiny pipelines and the try-out runs
TRYOUT_WORD = "<my-thing>"


def build_tryout_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py tryout",
        description="Try the whole loop offline: build a tiny random-weight pipeline (once, in runs/), train a "
        "short run on your photos into runs/tryout (runs/tryout-2, ... when it is taken), and generate an image "
        "with it. The weights are random, so the image is noise: this shows the commands and the files.",
    )
    p.add_argument("--photos", default="my_photos", help="Folder of 3-5 photos of your thing (default my_photos).")
    p.add_argument("--sdxl", action="store_true", help="The tiny SDXL-shaped pipeline instead of the SD 1.x one.")
    return p


def unused_folder(base: Path) -> Path:
    """`base`, or base-2, base-3, ...: the first that does not exist."""
    candidates = (base if k == 1 else base.with_name(f"{base.name}-{k}") for k in itertools.count(1))
    return next(p for p in candidates if not p.exists())


def run_tryout(args: argparse.Namespace) -> int:
    """`infer.py tryout`: the trainer's main, then run_generate, on a tiny pipeline built here."""
    import textual_inversion
    from bench.models import build_pipeline

    photos = Path(args.photos).expanduser()
    where = f"put 3-5 photos of your thing in {args.photos.rstrip('/')}/ or pass --photos FOLDER"
    if not photos.is_dir():
        raise UserError(f"{photos} does not exist: {where}")
    try:
        count = len(list_images(photos, warn=False))
    except UserError:
        raise UserError(f"{photos} holds no photos (png, jpg, webp, ...): {where}") from None
    shape, name = ("tiny-xl", "tiny-sdxl") if args.sdxl else ("tiny", "tiny-sd")
    model = TRYOUT_FOLDER / name
    if not (model / "model_index.json").is_file():
        print(f"building a tiny random-weight pipeline in {model} (once, offline)", file=sys.stderr)
        atomic_folder(model, lambda folder: build_pipeline(shape, folder))
    out = unused_folder(TRYOUT_FOLDER / "tryout")
    print(f"training {TRYOUT_WORD} on the {count} photos in {photos} into {out}", file=sys.stderr)
    status = textual_inversion.main(
        [
            *("--pretrained_model_name_or_path", str(model), "--train_data_dir", str(photos)),
            *("--placeholder_token", TRYOUT_WORD, "--initializer_token", "toy", "--output_dir", str(out)),
            *("--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "20", "--save_steps", "10"),
            *("--learning_rate", "5e-3", "--seed", "0", "--report_to", "none"),
        ]
    )
    if status:
        return status  # the trainer has said why
    prompt = f"a photo of {TRYOUT_WORD}"
    generate_args = ["--model", str(model), "--embedding", str(out), "--prompt", prompt, "--seed", "0", "--steps", "15"]
    generate_args += ["--height", "128", "--width", "128", "--out", str(out / "images")]
    for path in run_generate(build_generate_parser().parse_args(generate_args)):
        print(path)
    real = "stabilityai/stable-diffusion-xl-base-1.0" if args.sdxl else "stable-diffusion-v1-5/stable-diffusion-v1-5"
    print(
        f"trained {out}; with a real model: accelerate launch textual_inversion.py --pretrained_model_name_or_path "
        f'{real} --train_data_dir {photos} --placeholder_token "{TRYOUT_WORD}" --initializer_token toy',
        file=sys.stderr,
    )
    return 0


def embedding_record(token: str, emb: Embedding) -> dict:
    """How a PNG's settings name an embedding: our token and files, and A1111's name and short hash."""
    return {
        "token": token,
        "vectors": emb.num_vectors,
        "source": emb.source,
        "sha256": emb.sha256,
        "name": emb.a1111_name,
        "hash": emb.sha256[0][:12] if emb.sha256 else None,
    }


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
    command = argv.pop(0) if argv[:1] in (["generate"], ["convert"], ["eval"], ["tryout"]) else "generate"
    try:
        if command == "convert":
            args = build_convert_parser().parse_args(argv)
            for path in convert_embedding(args.src, args.out, args.to, args.token):
                print(path)
            return 0
        parsers = {"generate": build_generate_parser, "eval": build_eval_parser, "tryout": build_tryout_parser}
        args = parsers[command]().parse_args(argv)
        import diffusers
        import transformers

        for library in (diffusers, transformers):
            library.logging.set_verbosity_error()
            library.logging.disable_progress_bar()
        if command == "eval":
            run_eval(args)
            return 0
        if command == "tryout":
            return run_tryout(args)
        for path in run_generate(args):
            print(path)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


if __name__ == "__main__":
    sys.exit(main())
