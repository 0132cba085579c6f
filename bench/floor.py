"""The floor: a bare text-encoder + UNet forward and backward, with no trainer around them.

    python bench/floor.py MODEL_DIR RESOLUTION BATCH PRECISION RECORD.json

The least any Textual Inversion trainer must spend per sample: the text encoder and UNet
forward, and the backward through both down to the token embeddings (the output of the
embedding layer is made the leaf the gradient flows to). Per-sample time comes from
differencing a short and a long loop after a warm-up step, so start-up is excluded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model, resolution, batch, precision, record = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    xl = (Path(model) / "text_encoder_2").exists()
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)]
    if xl:
        encoders.append(CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", dtype=dtype))
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
    for module in (*encoders, unet):
        module.requires_grad_(False).to(device)
    for encoder in encoders:
        encoder.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    ids = tokenizer(["a photo of a toy"] * batch, padding="max_length", return_tensors="pt").input_ids.to(device)
    latent = resolution // 8
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device)

    def step() -> None:
        noisy = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        if xl:
            first, second = (e(ids, output_hidden_states=True) for e in encoders)
            hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1)
            added = {"text_embeds": second.text_embeds, "time_ids": time_ids.to(dtype)}
        else:
            hidden, added = encoders[0](ids)[0], None
        prediction = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        F.mse_loss(prediction.float(), noisy.float()).backward()

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(1)  # warm-up
    short, long = (3, 9) if device.type == "cpu" else (10, 40)
    elapsed_short, elapsed_long = timed(short), timed(long)
    per_sample = (elapsed_long - elapsed_short) / ((long - short) * batch)
    Path(record).write_text(json.dumps({"ms_per_sample": 1000 * per_sample}))


if __name__ == "__main__":
    main()
