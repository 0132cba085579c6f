"""Two levers measured on their own, where a whole-run comparison cannot separate them.

    python bench/levers.py vae --shape tiny --resolution 512
    python bench/levers.py rows --vocab 49408 --width 768

vae:  what encoding a photo costs (the reference script runs the VAE for every sample; this
      trainer runs it once per photo and view, then samples the cached posterior).
rows: one optimizer step of the embedding table the reference trains (a dense gradient over
      the whole vocabulary, AdamW over every row, then the frozen rows copied back) against
      this trainer's step over the N new rows only.
Each prints a Markdown section and appends it to bench/RESULTS.md (--results - to skip).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.bench import commit, machine, model_folder  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Seconds per call after a warm-up call."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def vae_lever(args: argparse.Namespace) -> list[str]:
    from diffusers import AutoencoderKL

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(model_folder(args), subfolder="vae").requires_grad_(False).to(device)
    pixels = torch.rand(1, 3, args.resolution, args.resolution, device=device) * 2 - 1

    @torch.no_grad()
    def encode() -> None:
        vae.encode(pixels).latent_dist.sample()

    seconds = timed(encode, args.repeats)
    return [
        f"VAE encode of one {args.resolution} px photo (fp32, batch 1), `{args.shape}` VAE: {1000 * seconds:.0f} ms.",
        "The reference spends this on every training sample; this trainer spends it on each photo's two "
        "views once, before the first step, then draws latents from the cached posteriors.",
    ]


def rows_lever(args: argparse.Namespace) -> list[str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab, width, n = args.vocab, args.width, args.num_vectors

    # The reference: the whole table is a parameter; its gradient is dense; AdamW updates every
    # row; the rows that must not change are then copied back from a saved original.
    table = torch.nn.Parameter(torch.randn(vocab, width, device=device))
    original = table.detach().clone()
    frozen = torch.ones(vocab, dtype=torch.bool, device=device)
    frozen[-n:] = False
    dense = torch.optim.AdamW([table], lr=1e-4)
    ids = torch.randint(0, vocab, (4, 77), device=device)

    def reference_step() -> None:
        torch.nn.functional.embedding(ids, table).sum().backward()
        dense.step()
        dense.zero_grad()
        with torch.no_grad():
            table[frozen] = original[frozen]

    # This trainer: only the N new rows exist as a trainable tensor.
    rows = torch.randn(n, width, device=device, requires_grad=True)
    sparse = torch.optim.AdamW([rows], lr=1e-4)
    new_ids = torch.randint(0, n, (4, 77), device=device)

    def our_step() -> None:
        torch.nn.functional.embedding(new_ids, rows).sum().backward()
        sparse.step()
        sparse.zero_grad()

    reference_s, ours_s = timed(reference_step, args.repeats), timed(our_step, args.repeats)
    state_mb = 3 * vocab * width * 4 / 2**20  # gradient + two AdamW moments, fp32
    copy_mb = vocab * width * 4 / 2**20  # the saved original rows
    return [
        f"Embedding-table step, vocabulary {vocab:,} x {width}, {n} new row(s):",
        "",
        "- reference (dense gradient, AdamW over every row, frozen rows copied back): "
        f"{1000 * reference_s:.2f} ms/step, {state_mb + copy_mb:.0f} MiB of gradient, optimizer state and saved rows",
        f"- this trainer (the {n} new row(s) only): {1000 * ours_s:.3f} ms/step, {3 * n * width * 4 / 1024:.1f} KiB",
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lever", choices=["vae", "rows"])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--model_dir", default=None)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49408)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--num_vectors", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    body = vae_lever(args) if args.lever == "vae" else rows_lever(args)
    command = "python " + shlex.join(["bench/levers.py", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join(
        [
            f"### Lever: {'latent caching' if args.lever == 'vae' else 'only the new rows are trainable'}",
            "",
            f"- commit: {commit()}; machine: {machine()}",
            f"- command: `{command}`",
            "",
            *body,
        ]
    )
    print(text)
    if args.results != "-":
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
