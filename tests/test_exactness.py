"""bench/exactness.py's comparisons: they catch the smallest real difference and ignore the clock.

The matrix itself (two trainers per case) is a proof run by hand, not a test; these check
that what it reports as equal is equal."""

from __future__ import annotations

import json

import torch
from PIL import Image
from safetensors.torch import save_file

from bench import exactness


def write_embedding(path, seed=0):
    save_file({"<concept>": torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))}, str(path))
    return path


def test_a_one_bit_difference_in_a_safetensors_file_is_found_and_located(tmp_path):
    rev = write_embedding(tmp_path / "rev.safetensors")
    data = bytearray(rev.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header] ^= 1  # the lowest mantissa bit of element [0, 0]
    new = tmp_path / "new.safetensors"
    new.write_bytes(bytes(data))
    assert exactness.compare_bytes(rev, write_embedding(tmp_path / "same.safetensors")) is None
    difference = exactness.compare_bytes(rev, new)
    assert difference.startswith("<concept>[0, 0]: ")
    assert difference.endswith("(1 element(s) differ)")


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_metrics_compare_every_value_but_the_timing_ones(tmp_path):
    records = [
        {"step": 0, "val_loss": 1.25},
        {"step": 1, "loss": 1.5, "lr": 0.005, "samples_per_second": 4.3, "embedding_norm": 0.13},
    ]
    rev = write_metrics(tmp_path / "rev.jsonl", records)
    faster = [records[0], {**records[1], "samples_per_second": 9.9}]
    assert exactness.compare_metrics(rev, write_metrics(tmp_path / "faster.jsonl", faster)) is None
    other_loss = [records[0], {**records[1], "loss": 1.5000000000000002}]  # one ulp
    difference = exactness.compare_metrics(rev, write_metrics(tmp_path / "loss.jsonl", other_loss))
    assert difference == "record 2 (step 1): loss 1.5 vs 1.5000000000000002"
    shorter = exactness.compare_metrics(rev, write_metrics(tmp_path / "short.jsonl", records[:1]))
    assert shorter == "2 vs 1 records"


def test_folders_differ_in_file_names_but_not_in_logs_or_the_checkpoint_layout(tmp_path):
    rev, new = tmp_path / "rev", tmp_path / "new"
    for folder, state in ((rev, b"old layout"), (new, b"new layout")):
        (folder / "checkpoint-2" / "logs").mkdir(parents=True)
        write_embedding(folder / "learned_embeds.safetensors")
        (folder / "checkpoint-2" / "training_state.pt").write_bytes(state)
        (folder / "token_identifier.txt").write_text("<concept>")
    (new / "logs").mkdir()
    (new / "logs" / "events.out").write_text("tracker output")
    same = exactness.compare_folders(rev, new)
    assert same.equal and same.compared == 2
    (new / "learned_embeds-last.safetensors").write_bytes(b"")
    (new / "token_identifier.txt").write_text("<other>")
    different = exactness.compare_folders(rev, new)
    assert different.differences == [
        "file names differ; only in the working tree: learned_embeds-last.safetensors",
        "token_identifier.txt: line 1: '<concept>' vs '<other>'",
    ]


def test_images_compare_by_their_pixels(tmp_path):
    image = Image.new("RGB", (8, 4), (10, 20, 30))
    image.save(tmp_path / "rev.png")
    image.save(tmp_path / "same.png", compress_level=1)  # other bytes, the same pixels
    image.putpixel((5, 2), (10, 20, 31))
    image.save(tmp_path / "new.png")
    assert exactness.compare_images(tmp_path / "rev.png", tmp_path / "same.png") is None
    difference = exactness.compare_images(tmp_path / "rev.png", tmp_path / "new.png")
    assert difference == "pixels differ, first at (x, y) = (5, 2): (10, 20, 30) vs (10, 20, 31)"
