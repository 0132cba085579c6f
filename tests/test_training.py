"""What training changes (the new rows, nothing else) and how it computes the loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import RESOLUTION, plan_for, train_args
from safetensors.torch import load_file

import infer
import textual_inversion as ti


def build_stages(model, photos, tmp_path, num_vectors=1, dtype=torch.float32, **flags):
    """models -> placeholders -> concept, through the script's own stage functions."""
    args = ti.parse_args(train_args(model, photos, tmp_path / "out", num_vectors=num_vectors, **flags))
    dataset = ti.TextualInversionDataset(photos, RESOLUTION, args.center_crop, placeholder_token="<concept>")
    models = ti.load_models(args, torch.device("cpu"), dtype)
    placeholders = ti.add_placeholder_tokens(models, infer.vector_tokens("<concept>", num_vectors), "toy")
    prompts = [t.replace("{}", " ".join(placeholders.tokens)) for t in dataset.templates]
    concept = ti.encode_photos(ti.decode_images(dataset, 0), prompts, models, placeholders)
    return SimpleNamespace(args=args, models=models, placeholders=placeholders, data=concept)


def a_batch(stages, size=4, seed=123):
    generator = torch.Generator().manual_seed(seed)
    images = torch.arange(size) % stages.data.num_images
    return ti.draw_batch(generator, images, stages.data, 1000)


def test_frozen_models_have_no_trainable_weights(tiny_sd, photos, tmp_path):
    s = build_stages(tiny_sd, photos, tmp_path)
    for module in (*s.models.text_encoders, s.models.unet, s.models.vae):
        assert not any(p.requires_grad for p in module.parameters())
    assert [r.requires_grad for r in s.placeholders.rows] == [True]


def test_placeholder_tokens_follow_diffusers_multi_vector_naming(tiny_sd, photos, tmp_path):
    s = build_stages(tiny_sd, photos, tmp_path, num_vectors=3)
    assert s.placeholders.tokens == ["<concept>", "<concept>_1", "<concept>_2"]
    tokenizer = s.models.tokenizers[0]
    assert tokenizer.convert_tokens_to_ids(s.placeholders.tokens) == s.placeholders.ids[0]


def test_each_new_row_starts_as_the_initializer_row(tiny_sd, photos, tmp_path):
    s = build_stages(tiny_sd, photos, tmp_path, num_vectors=2)
    tokenizer, encoder = s.models.tokenizers[0], s.models.text_encoders[0]
    init_id = tokenizer.encode("toy", add_special_tokens=False)[0]
    initializer_row = encoder.get_input_embeddings().frozen.weight[init_id]
    assert torch.equal(s.placeholders.rows[0], initializer_row.expand(2, -1))


def test_the_encoder_reads_the_new_rows_for_placeholder_ids(tiny_sd, photos, tmp_path):
    s = build_stages(tiny_sd, photos, tmp_path, num_vectors=2)
    with torch.no_grad():
        s.placeholders.rows[0].copy_(torch.randn_like(s.placeholders.rows[0]))
    embedding = s.models.text_encoders[0].get_input_embeddings()
    ids = torch.tensor([[0, 5, *s.placeholders.ids[0]]])
    out = embedding(ids)
    assert torch.equal(out[0, 2:], s.placeholders.rows[0])
    assert torch.equal(out[0, :2], embedding.frozen.weight[[0, 5]])


def test_latents_are_cached_for_every_photo_and_its_mirror(tiny_sd, photos, tmp_path):
    s = build_stages(tiny_sd, photos, tmp_path)
    latent = RESOLUTION // 8
    assert s.data.latent_mean.shape == (3, 2, 4, latent, latent)
    assert (s.data.latent_std > 0).all()
    assert not torch.equal(s.data.latent_mean[:, 0], s.data.latent_mean[:, 1])


def test_prompts_are_tokenized_once_with_the_placeholder_ids(tiny_sd, photos, tmp_path):
    s = build_stages(tiny_sd, photos, tmp_path, num_vectors=2)
    ids = s.data.prompt_ids[0]
    assert ids.shape == (27, 77)
    for placeholder_id in s.placeholders.ids[0]:
        assert ((ids == placeholder_id).sum(dim=1) == 1).all()


def test_one_fused_call_gives_the_gradient_of_accumulation(tiny_sd, photos, tmp_path):
    s = build_stages(tiny_sd, photos, tmp_path)
    batch = a_batch(s, size=4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rows = s.placeholders.rows[0]
    grads, losses = [], []
    for chunk in (4, 1, 3):  # fused, classic accumulation 4 x 1, uneven chunks
        rows.grad = None
        losses.append(ti.accumulate_gradients(s.models, s.data, batch, chunk, scaler))
        grads.append(rows.grad.clone())
    assert grads[0].abs().sum() > 0
    for grad, loss in zip(grads[1:], losses[1:]):
        torch.testing.assert_close(grad, grads[0], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(loss, losses[0])


def test_the_loss_is_mse_on_epsilon(tiny_sd, photos, tmp_path):
    s = build_stages(tiny_sd, photos, tmp_path)
    batch = a_batch(s, size=2)
    latents = (
        s.data.latent_mean[batch.image, batch.flip] + s.data.latent_std[batch.image, batch.flip] * batch.posterior_noise
    )
    noisy = s.models.noise_scheduler.add_noise(latents, batch.noise, batch.timesteps)
    with torch.no_grad():
        hidden = s.models.text_encoders[0](s.data.prompt_ids[0][batch.template])[0]
        expected = ((s.models.unet(noisy, batch.timesteps, hidden).sample - batch.noise) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(ti.denoising_loss(s.models, s.data, batch), expected)


def test_v_prediction_models_are_trained_on_velocity(tiny_sd_v, photos, tmp_path):
    s = build_stages(tiny_sd_v, photos, tmp_path)
    assert s.models.noise_scheduler.config.prediction_type == "v_prediction"
    batch = a_batch(s, size=2)
    latents = (
        s.data.latent_mean[batch.image, batch.flip] + s.data.latent_std[batch.image, batch.flip] * batch.posterior_noise
    )
    scheduler = s.models.noise_scheduler
    noisy = scheduler.add_noise(latents, batch.noise, batch.timesteps)
    velocity = scheduler.get_velocity(latents, batch.noise, batch.timesteps)
    with torch.no_grad():
        hidden = s.models.text_encoders[0](s.data.prompt_ids[0][batch.template])[0]
        expected = ((s.models.unet(noisy, batch.timesteps, hidden).sample - velocity) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(ti.denoising_loss(s.models, s.data, batch), expected)


def test_sample_order_visits_every_slot_once_per_epoch():
    order = ti.sample_positions(seed=7, start=0, count=15, length=15, device=torch.device("cpu"))
    assert sorted(order.tolist()) == list(range(15))
    again = ti.sample_positions(seed=7, start=4, count=6, length=15, device=torch.device("cpu"))
    assert torch.equal(again, order[4:10])  # any window of the stream, the same samples


def test_training_changes_only_the_new_rows(tiny_sd, photos, tmp_path, run_trainer):
    """No other row of the vocabulary changes, bit for bit: checked on the saved full pipeline."""
    from transformers import CLIPTextModel

    out = tmp_path / "out"
    run_trainer(train_args(tiny_sd, photos, out, "--save_as_full_pipeline", num_vectors=2))
    before = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").get_input_embeddings().weight
    after = CLIPTextModel.from_pretrained(out, subfolder="text_encoder").get_input_embeddings().weight
    vocab = before.shape[0]
    assert after.shape[0] == vocab + 2
    assert torch.equal(after[:vocab], before)
    learned = load_file(out / "learned_embeds.safetensors")["<concept>"]
    assert torch.equal(after[vocab:], learned)
    from transformers import CLIPTokenizer

    init_id = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer").encode("toy", add_special_tokens=False)[0]
    assert not torch.equal(learned[0], before[init_id])  # it did train


def test_bf16_runs_frozen_models_in_bf16_and_keeps_rows_fp32(tiny_sd, photos, tmp_path, run_trainer):
    s = build_stages(tiny_sd, photos, tmp_path, dtype=torch.bfloat16)
    assert s.models.unet.dtype == torch.bfloat16 and s.models.text_encoders[0].dtype == torch.bfloat16
    assert s.placeholders.rows[0].dtype == torch.float32
    out = tmp_path / "bf16"
    run_trainer(train_args(tiny_sd, photos, out, mixed_precision="bf16"))
    learned = load_file(out / "learned_embeds.safetensors")["<concept>"]
    assert learned.dtype == torch.float32 and torch.isfinite(learned).all()


def test_scale_lr_multiplies_by_the_effective_batch(tiny_sd, photos, tmp_path, run_trainer):
    """With Adam the first step moves each weight by about lr, so the step size shows the lr."""
    init = None
    moves = []
    for flag in ((), ("--scale_lr",)):
        out = tmp_path / f"lr{len(flag)}"
        run_trainer(train_args(tiny_sd, photos, out, *flag, max_train_steps=1, adam_weight_decay=0, train_batch_size=2))
        learned = load_file(out / "learned_embeds.safetensors")["<concept>"]
        if init is None:
            s = build_stages(tiny_sd, photos, tmp_path)
            init = s.placeholders.rows[0].detach()
        moves.append((learned - init).abs().max().item())
    assert moves[1] == pytest.approx(moves[0] * 4, rel=1e-3)  # batch 2 x accumulation 2


def test_total_steps_come_from_epochs_when_max_steps_is_unset():
    def max_steps(**flags) -> int:
        argv = train_args("m", "d", "out", train_batch_size=2, gradient_accumulation_steps=2, repeats=10, **flags)
        return plan_for(ti.parse_args(argv), num_images=4).max_steps

    assert max_steps(max_train_steps=None, num_train_epochs=3) == 3 * 10  # 40 samples / 4 per step
    assert max_steps(max_train_steps=7, num_train_epochs=3) == 7
    assert max_steps(max_train_steps=None) == 5000


@pytest.mark.slow  # tracing four graphs, twice: the longest test in this process
def test_compile_builds_each_graph_once_and_never_recompiles(tiny_sd, photos, tmp_path, run_trainer):
    """UNet and text encoder, with and without grad (validation): four graphs, however long
    the run. (The eager backend traces like inductor but skips code generation.)"""
    from torch._dynamo.utils import counters

    counts = []
    for steps in (2, 7):
        flags = dict(max_train_steps=steps, validation_steps=3, compile_backend="eager", train_batch_size=3)
        before = counters["stats"]["unique_graphs"]
        run_trainer(train_args(tiny_sd, photos, tmp_path / f"out{steps}", "--compile", **flags))
        counts.append(counters["stats"]["unique_graphs"] - before)
    assert counts == [4, 4]
