"""Peak memory of load_models: one original-layout file against the same weights as a diffusers folder.

    python bench/load_memory.py sd15 --work /tmp/loadmem            # builds, converts, measures
    python bench/load_memory.py sdxl --work /tmp/loadmem --dtype fp16

Builds the random-weight `shape` folder (bench/models.py) at --dtype once, writes it as one
original-layout .safetensors (and .ckpt with --ckpt), then loads each source with the trainer's
own load_models at --dtype in a fresh process per measurement and reads the process's peak
resident set (VmHWM in /proc/self/status, which counts the file's mapped pages it touched too):
once right after loading (weights still memory-mapped and untouched count nothing) and once
after every weight has been read, as the first training step reads them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(source: str, config: str | None, dtype: str) -> dict:
    """In this (fresh) process: load_models once; peak RSS before and after."""
    import torch

    import textual_inversion as ti

    argv = ["--pretrained_model_name_or_path", source, "--train_data_dir", ".", "--placeholder_token", "<x>"]
    argv += ["--initializer_token", "toy"] + (["--single_file_config", config] if config else [])
    args = ti.build_parser().parse_args(argv)
    weight_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    before = status_kib("VmHWM")
    start = time.perf_counter()
    models = ti.load_models(args, torch.device("cpu"), weight_dtype)
    seconds = time.perf_counter() - start
    peak_loading = status_kib("VmHWM")
    modules = [*models.text_encoders, models.unet, models.vae]
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    with torch.no_grad():  # read every weight once, as the first step does: memory-mapped ones become resident
        for module in modules:
            for p in module.parameters():
                p.sum()
    return {
        "peak_mib": status_kib("VmHWM") / 1024,
        "peak_loading_mib": peak_loading / 1024,
        "peak_before_load_mib": before / 1024,
        "rss_after_mib": status_kib("VmRSS") / 1024,
        "weights_mib": weights / 2**20,
        "seconds": seconds,
    }


def in_fresh_process(source: Path, config: Path | None, dtype: str) -> dict:
    command = [sys.executable, __file__, "--measure", str(source), "--dtype", dtype]
    if config is not None:
        command += ["--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement of {source} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", nargs="?", help="A shape of bench/models.py: sd15, sdxl, ...")
    parser.add_argument("--work", default="/tmp/load_memory", help="Where the folder and files are written.")
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="Stored and loaded precision.")
    parser.add_argument("--ckpt", action="store_true", help="Also measure the weights as a .ckpt pickle.")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.config, args.dtype)))
        return

    import torch

    from bench.models import build_pipeline, write_single_file

    work = Path(args.work) / f"{args.shape}-{args.dtype}"
    folder = work / "pipe"
    if not (folder / "model_index.json").exists():
        stored = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        build_pipeline(args.shape, folder, dtype=stored)
    files = [work / "model.safetensors"] + ([work / "model.ckpt"] if args.ckpt else [])
    for file in files:
        if not file.exists():
            write_single_file(folder, file)
    rows = {"folder": in_fresh_process(folder, None, args.dtype)}
    for file in files:
        rows[file.name] = in_fresh_process(file, folder, args.dtype)
    base = rows["folder"]["peak_mib"]
    print(f"{args.shape} at {args.dtype}: load_models peak RSS (VmHWM)")
    header = ["source", "peak MiB", "x folder", "at load MiB", "weights MiB", "before MiB", "seconds"]
    print(f"{header[0]:<20}" + "".join(f"{h:>13}" for h in header[1:]))
    for name, r in rows.items():
        values = [r["peak_mib"], r["peak_mib"] / base, r["peak_loading_mib"], r["weights_mib"]]
        values += [r["peak_before_load_mib"], r["seconds"]]
        print(f"{name:<20}" + "".join(f"{v:>13.2f}" if i == 1 else f"{v:>13.0f}" for i, v in enumerate(values)))


if __name__ == "__main__":
    main()
