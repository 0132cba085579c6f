"""Every pickle the project writes (.bin, .pt) passes A1111's safety check, and still loads in
diffusers and torch.load(weights_only=True) with the trained rows.

A1111 will not torch.load a .pt/.bin/.ckpt until it has checked it (its modules/safe.py). Its
rules, in our words:

- A zip-format file (torch.save's default) may contain only the pickle `data.pkl`, a `version`
  record and numbered tensor blobs `data/<n>`, each one folder deep, and exactly one `data.pkl`.
  Any other entry refuses the whole file. (A1111 1.10 also lets `byteorder` and
  `.data/serialization_id` through; earlier releases do not, so the check here keeps to the
  shorter list.) torch 2.13's default zip adds `.format_version` and `.storage_alignment`,
  which no A1111 release accepts.
- A file that is not a zip is torch's legacy format: five pickles in a row (magic number,
  protocol, system info, the data, the list of storage keys) and then the raw tensor bytes. A1111
  reads the five pickles.
- Every global a checked pickle imports must be on a short list (ALLOWED_GLOBALS below): the
  tensor and parameter rebuilders, torch's typed storages, OrderedDict, ParameterDict, a few numpy
  reconstructors, set, _codecs.encode and two pytorch_lightning checkpoint names. Anything else,
  such as a function that could run code, refuses the file.

The checks below read the opcodes with pickletools and never run the pickle.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, train_args, train_once
from safetensors.torch import load_file

import infer

ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(("torch", kind + "Storage") for kind in ("Float", "Half", "Int", "Long", "Double", "Byte", "BFloat16")),
    ("torch", "float32"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("__builtin__", "set"),
    ("pytorch_lightning.callbacks", "model_checkpoint"),
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
}
LEGACY_PICKLES = 5
STRING_OPCODES = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def globals_of_one_pickle(stream: io.BufferedIOBase) -> list[tuple[str, str]]:
    """The (module, name) pairs the next pickle in `stream` imports, from its opcodes alone.

    Protocols <= 3 name a global in the GLOBAL opcode's argument; protocol 4+ pushes the module
    and the name as two strings (or memo fetches of earlier strings) and then STACK_GLOBAL. Values
    that are not strings are tracked as None, so a STACK_GLOBAL built any other way shows up as
    an unresolved ("?", "?") global, which no allow-list holds."""
    found: list[tuple[str, str]] = []
    pushed: list[str | None] = []  # what each value-pushing opcode left on top, where it is a string
    memo: dict[int, str | None] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name == "GLOBAL":
            module, _, attribute = arg.partition(" ")
            found.append((module, attribute))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attribute = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            resolved = isinstance(module, str) and isinstance(attribute, str)
            found.append((module, attribute) if resolved else ("?", "?"))
            pushed.append(None)
        elif name in STRING_OPCODES:
            pushed.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
        elif name in MEMO_GETS:
            pushed.append(memo.get(arg))
        elif name in MEMO_PUTS:
            memo[arg] = pushed[-1] if pushed else None
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif opcode.stack_after:
            pushed.append(None)
    return found


def a1111_refusal(path: Path) -> str | None:
    """Why A1111's safety check would refuse `path`, or None when it passes (rules: module docstring)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for entry in names:
                folder, _, inside = entry.partition("/")
                blob = inside.startswith("data/") and inside[len("data/") :].isdigit()
                if not folder or not (inside in ("data.pkl", "version") or blob):
                    return f"entry {entry} is not allowed"
            pickles = [n for n in names if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                return f"{len(pickles)} data.pkl entries; exactly one is allowed"
            with archive.open(pickles[0]) as data:
                imported = globals_of_one_pickle(data)
    else:
        imported = []
        with open(path, "rb") as f:
            for index in range(LEGACY_PICKLES):
                try:
                    imported += globals_of_one_pickle(f)
                except ValueError as e:  # a truncated or garbled stream: A1111 calls it corrupt
                    return f"legacy pickle {index + 1} of {LEGACY_PICKLES} does not read ({e})"
    forbidden = sorted({f"{module}.{attribute}" for module, attribute in imported} - _allowed_names())
    return f"imports {', '.join(forbidden)}" if forbidden else None


def _allowed_names() -> set[str]:
    return {f"{module}.{attribute}" for module, attribute in ALLOWED_GLOBALS}


def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".bin", ".pt"))


# ----------------------------------------------------------------------------------------
# The check itself can fail: torch's default files and code-running pickles are refused.


def test_torch_default_zip_files_break_the_a1111_rules(tmp_path):
    torch.save({"<x>": torch.zeros(2, 32)}, tmp_path / "default.pt")
    refusal = a1111_refusal(tmp_path / "default.pt")
    assert refusal is not None and "is not allowed" in refusal


def test_a_zip_with_only_the_allowed_entries_passes(tmp_path):
    buffer = io.BytesIO()
    torch.save({"<x>": torch.zeros(2, 32)}, buffer)
    with zipfile.ZipFile(buffer) as full, zipfile.ZipFile(tmp_path / "trimmed.pt", "w") as trimmed:
        for entry in full.namelist():
            if entry.split("/", 1)[1] in ("data.pkl", "version", "data/0"):
                trimmed.writestr(entry, full.read(entry))
    assert a1111_refusal(tmp_path / "trimmed.pt") is None


def test_a_legacy_file_that_imports_a_global_off_the_list_is_refused(tmp_path):
    torch.save({"counts": collections.Counter(a=1)}, tmp_path / "counter.pt", _use_new_zipfile_serialization=False)
    assert a1111_refusal(tmp_path / "counter.pt") == "imports collections.Counter"


def test_a_file_with_fewer_than_five_pickles_is_refused(tmp_path):
    (tmp_path / "plain.bin").write_bytes(pickle.dumps({"<x>": [0.0, 1.0]}))
    assert "legacy pickle 2 of 5 does not read" in a1111_refusal(tmp_path / "plain.bin")


@pytest.mark.parametrize("protocol", [2, 4])
def test_the_opcode_walk_names_a_code_running_global_in_either_protocol(protocol):
    payload = pickle.dumps({"a": "system", "run": os.system}, protocol=protocol)
    assert (os.system.__module__, "system") in globals_of_one_pickle(io.BytesIO(payload))


def test_the_opcode_walk_resolves_a_stack_global_from_a_memoized_module_name():
    # The second class's module name is a memo fetch of the string written for the first.
    payload = pickle.dumps([collections.Counter, collections.OrderedDict], protocol=4)
    assert b"collections" not in payload.split(b"Counter", 1)[1]
    assert globals_of_one_pickle(io.BytesIO(payload)) == [("collections", "Counter"), ("collections", "OrderedDict")]


# ----------------------------------------------------------------------------------------
# Every pickle the project writes passes, and loads back in diffusers and torch.


@pytest.fixture(scope="module")
def trained_bins(tiny_sd, photos, tmp_path_factory):
    """A run saving .bin everywhere: final, every-N-steps and checkpoint embeddings and the
    checkpoint's training_state.pt."""
    out = tmp_path_factory.mktemp("bins") / "out"
    argv = train_args(tiny_sd, photos, out, "--no_safe_serialization", num_vectors=2, save_steps=2)
    train_once([*argv, "--checkpointing_steps", "2"])
    return out


@pytest.fixture(scope="module")
def trained_default(tiny_sd, photos, tmp_path_factory):
    """A run with the default flags: learned_embeds.safetensors, and learned_embeds.bin beside it."""
    out = tmp_path_factory.mktemp("default") / "out"
    train_once(train_args(tiny_sd, photos, out, num_vectors=2))
    return out


@pytest.fixture(scope="module")
def a1111_pt(trained_default, tmp_path_factory) -> Path:
    """`infer.py convert OUT FOLDER --to a1111`, run as a user runs it."""
    folder = tmp_path_factory.mktemp("a1111")
    command = [sys.executable, str(ROOT / "infer.py"), "convert", str(trained_default), str(folder), "--to", "a1111"]
    subprocess.run(command, check=True, capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return folder / "concept.pt"


def trained_rows(out: Path) -> torch.Tensor:
    return load_file(out / "learned_embeds.safetensors")["<concept>"]


def test_the_bin_written_beside_the_safetensors_passes_the_a1111_rules(trained_default):
    assert a1111_refusal(trained_default / "learned_embeds.bin") is None


def test_every_pickle_of_a_no_safe_serialization_run_passes_the_a1111_rules(trained_bins):
    files = pickle_files(trained_bins)
    assert {p.name for p in files} >= {"learned_embeds.bin", "learned_embeds-steps-2.bin", "training_state.pt"}
    assert {p.name: a1111_refusal(p) for p in files} == {p.name: None for p in files}


def test_the_converted_a1111_pt_passes_the_a1111_rules(a1111_pt):
    assert a1111_refusal(a1111_pt) is None


@pytest.mark.parametrize(
    "write",
    [
        lambda path: infer.write_diffusers_embedding(path, "<x>", torch.randn(3, 32)),
        lambda path: infer.write_a1111_embedding(path, "<x>", torch.randn(3, 32), step=7),
    ],
    ids=["diffusers", "a1111"],
)
def test_every_embedding_writer_saving_a_pickle_passes_the_a1111_rules(write, tmp_path):
    assert a1111_refusal(write(tmp_path / "embedding.bin")) is None


def test_pickles_are_written_in_the_legacy_format_not_a_zip(trained_default, a1111_pt):
    assert not zipfile.is_zipfile(trained_default / "learned_embeds.bin")
    assert not zipfile.is_zipfile(a1111_pt)


def test_the_bin_loads_with_weights_only_and_holds_the_trained_rows(trained_default):
    data = torch.load(trained_default / "learned_embeds.bin", weights_only=True)
    assert list(data) == ["<concept>"] and torch.equal(data["<concept>"], trained_rows(trained_default))


def test_the_a1111_pt_loads_with_weights_only_and_holds_the_trained_rows(trained_default, a1111_pt):
    data = torch.load(a1111_pt, weights_only=True)
    assert data["name"] == "<concept>" and torch.equal(data["string_to_param"]["*"], trained_rows(trained_default))


@pytest.mark.parametrize("which", ["learned_embeds.bin", "a1111 .pt"])
def test_diffusers_load_textual_inversion_reads_the_pickle_with_rows_equal(which, trained_default, a1111_pt, tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    source = trained_default / "learned_embeds.bin" if which == "learned_embeds.bin" else a1111_pt
    pipe.load_textual_inversion(str(source))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<concept>", "<concept>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], trained_rows(trained_default))


def test_a_checkpoint_of_legacy_pickles_resumes(trained_bins, photos, tiny_sd, tmp_path):
    out = tmp_path / "resumed"
    argv = train_args(tiny_sd, photos, out, "--no_safe_serialization", num_vectors=2, max_train_steps=3)
    result = train_once([*argv, "--resume_from_checkpoint", str(trained_bins / "checkpoint-2")])
    assert result.first_step == 2
