#!/usr/bin/env python
"""Embedding files: the one place that writes and reads Textual Inversion formats.

(The generation CLI grows around this in infer.py's own issue; the trainer imports the
writers from here so what it saves and what is read back cannot drift apart.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` for a temp file beside `path`, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Save `{name: tensor}` as safetensors or, for .bin/.pt, as a plain torch pickle of tensors."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    if str(path).endswith(".safetensors"):
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def write_diffusers_embedding(path: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """diffusers / sd-concepts-library layout: `{token: float32 [N, D]}`."""
    return write_tensors(path, {token: vectors})


def write_sdxl_embedding(path: str | Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """The single-file SDXL layout that A1111, ComfyUI, kohya and invoke-training read."""
    return write_tensors(path, {"clip_l": clip_l, "clip_g": clip_g})


def file_name_for_token(token: str) -> str:
    """A file name from a token, safe on every OS: '<cat-toy>' -> 'cat-toy'."""
    name = "".join("_" if c in '<>:"/\\|?*' or ord(c) < 32 else c for c in token).strip("_ .")
    return name or "embedding"
