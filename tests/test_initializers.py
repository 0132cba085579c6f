"""Where the new word starts: a word or phrase (--initializer_token), or an existing embedding
(--initializer_embedding). Rows are checked exactly, as they stand before the first step."""

from __future__ import annotations

import pytest
import torch
from conftest import plan_for, train_args, train_once
from safetensors.torch import load_file
from test_errors import fails_cleanly

import infer
import textual_inversion as ti


def start(model, photos, tmp_path, **flags):
    """(models, placeholders) through the stages run() calls before training."""
    args = ti.parse_args(train_args(model, photos, tmp_path / "out", **flags))
    embedding = ti.read_initializer_embedding(args)
    plan = plan_for(args, initializer=embedding)
    models = ti.load_models(args, torch.device("cpu"), torch.float32)
    return models, ti.add_placeholder_tokens(models, plan.concepts[0].tokens, embedding or args.initializer_token)


def phrase_token_rows(models, phrase: str) -> list[torch.Tensor]:
    """Per text encoder: the frozen rows of the phrase's tokens, [T, D]."""
    found = []
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        ids = tokenizer.encode(phrase, add_special_tokens=False)
        found.append(encoder.get_input_embeddings().frozen.weight[ids])
    return found


def vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# A phrase.


def test_more_vectors_than_phrase_tokens_spread_the_phrase_over_the_vectors(tiny_sd, photos, tmp_path):
    """N = 5, T = 3: vector i starts from token floor(i*3/5), i.e. tokens 0, 0, 1, 1, 2."""
    models, placeholders = start(tiny_sd, photos, tmp_path, initializer_token="red toy cat", num_vectors=5)
    (tokens,) = phrase_token_rows(models, "red toy cat")
    assert tokens.shape[0] == 3
    assert torch.equal(placeholders.rows[0], tokens[[0, 0, 1, 1, 2]])


def test_fewer_vectors_than_phrase_tokens_start_from_the_mean_of_their_share(tiny_sd, photos, tmp_path):
    """N = 2, T = 5: vector 0 is the mean of tokens 0-1, vector 1 of tokens 2-4."""
    phrase = "red toy cat dog duck"
    models, placeholders = start(tiny_sd, photos, tmp_path, initializer_token=phrase, num_vectors=2)
    (tokens,) = phrase_token_rows(models, phrase)
    assert tokens.shape[0] == 5
    assert torch.equal(placeholders.rows[0], torch.stack([tokens[0:2].mean(0), tokens[2:5].mean(0)]))


def test_one_vector_starts_from_the_mean_of_the_whole_phrase(tiny_sd, photos, tmp_path):
    models, placeholders = start(tiny_sd, photos, tmp_path, initializer_token="stuffed toy cat", num_vectors=1)
    (tokens,) = phrase_token_rows(models, "stuffed toy cat")
    assert tokens.shape[0] > 3  # "stuffed" is several pieces in the tiny vocabulary
    assert torch.equal(placeholders.rows[0], tokens.mean(0, keepdim=True))


def test_each_sdxl_encoder_spreads_the_phrase_over_its_own_rows(tiny_sdxl, photos, tmp_path):
    models, placeholders = start(tiny_sdxl, photos, tmp_path, initializer_token="red toy cat", num_vectors=2)
    for rows, tokens in zip(placeholders.rows, phrase_token_rows(models, "red toy cat"), strict=True):
        assert torch.equal(rows, torch.stack([tokens[0], tokens[1:3].mean(0)]))


# ----------------------------------------------------------------------------------------
# An embedding.


@pytest.fixture(scope="module")
def trained_sd(tiny_sd, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("initializer_sd") / "out"
    train_once(train_args(tiny_sd, photos, out, num_vectors=2, max_train_steps=2))
    return out


def test_our_output_folder_is_continued_from_its_learned_rows(tiny_sd, photos, tmp_path, trained_sd):
    flags = dict(initializer_token=None, initializer_embedding=trained_sd)
    _, placeholders = start(tiny_sd, photos, tmp_path, **flags)
    learned = load_file(trained_sd / "learned_embeds.safetensors")["<concept>"]
    assert placeholders.tokens == ["<concept>", "<concept>_1"]  # the vector count comes from the folder
    assert torch.equal(placeholders.rows[0], learned)


def test_an_a1111_embedding_sets_the_vector_count_and_the_rows(tiny_sd, photos, tmp_path):
    source = infer.write_a1111_embedding(tmp_path / "old.pt", "old", vectors(3, 32))
    _, placeholders = start(tiny_sd, photos, tmp_path, initializer_token=None, initializer_embedding=source)
    assert len(placeholders.tokens) == 3
    assert torch.equal(placeholders.rows[0], vectors(3, 32))


def test_an_sdxl_clip_l_clip_g_file_starts_both_encoders(tiny_sdxl, photos, tmp_path):
    source = infer.write_sdxl_embedding(tmp_path / "xl.safetensors", vectors(2, 32, 1), vectors(2, 64, 2))
    _, placeholders = start(tiny_sdxl, photos, tmp_path, initializer_token=None, initializer_embedding=source)
    assert torch.equal(placeholders.rows[0], vectors(2, 32, 1))
    assert torch.equal(placeholders.rows[1], vectors(2, 64, 2))


def test_a_run_from_an_embedding_trains_its_vectors(tiny_sd, photos, tmp_path, run_trainer):
    """Through the command line: no --num_vectors, no --initializer_token; with a zero learning
    rate the saved rows are the starting rows."""
    source = infer.write_a1111_embedding(tmp_path / "old.pt", "old", vectors(3, 32))
    out = tmp_path / "out"
    argv = train_args(tiny_sd, photos, out, initializer_token=None, learning_rate=0, max_train_steps=1)
    run_trainer([*argv, "--initializer_embedding", source])
    assert torch.equal(load_file(out / "learned_embeds.safetensors")["<concept>"], vectors(3, 32))


def test_a_different_num_vectors_than_the_embedding_is_refused(tiny_sd, photos, tmp_path, capsys):
    source = infer.write_a1111_embedding(tmp_path / "old.pt", "old", vectors(2, 32))
    argv = train_args(tiny_sd, photos, tmp_path / "out", initializer_token=None, num_vectors=3)
    expected = f"--num_vectors 3: the --initializer_embedding {source} has 2; leave --num_vectors out, or give 2"
    fails_cleanly(capsys, [*argv, "--initializer_embedding", source], expected)


def test_an_embedding_of_another_width_is_refused_naming_both(tiny_sd, photos, tmp_path, capsys):
    source = infer.write_a1111_embedding(tmp_path / "sd15.pt", "sd15", vectors(1, 768))
    argv = train_args(tiny_sd, photos, tmp_path / "out", initializer_token=None)
    expected = "its vectors are 768 wide, made for SD 1.x, but the base model's text encoder takes 32"
    fails_cleanly(capsys, [*argv, "--initializer_embedding", source], expected)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_embedding_is_refused_naming_the_flag(tiny_sd, photos, tmp_path, capsys):
    argv = train_args(tiny_sd, photos, tmp_path / "out", initializer_token=None)
    fails_cleanly(capsys, [*argv, "--initializer_embedding", tmp_path / "missing.pt"], "--initializer_embedding")


def test_an_initializer_that_splits_into_pieces_is_said_in_one_line(tiny_sd, photos, tmp_path, caplog):
    with caplog.at_level("INFO", "textual_inversion"):
        models, _ = start(tiny_sd, photos, tmp_path, initializer_token="xyzzyq", num_vectors=2)
    pieces = models.tokenizers[0].tokenize("xyzzyq")
    [line] = [r for r in caplog.records if "--initializer_token 'xyzzyq'" in r.getMessage()]
    assert line.levelname == "WARNING"  # one word in several pieces: likely a typo
    assert line.getMessage().startswith(f"--initializer_token 'xyzzyq' is {len(pieces)} tokens ({' '.join(pieces)})")
    assert "vector 1 from" in line.getMessage() and "vector 2 from" in line.getMessage()


def test_a_phrase_of_known_words_is_said_as_information(tiny_sd, photos, tmp_path, caplog):
    with caplog.at_level("INFO", "textual_inversion"):
        start(tiny_sd, photos, tmp_path, initializer_token="red toy")
    [line] = [r for r in caplog.records if "--initializer_token 'red toy'" in r.getMessage()]
    assert line.levelname == "INFO"
    assert line.getMessage().endswith("the vector starts from the mean of red</w>, toy</w>")
