"""A drop-in for diffusers' textual_inversion.py: its flags, with their meanings."""

from __future__ import annotations

import shlex
import subprocess
import sys

from conftest import ROOT, plan_for

import textual_inversion as ti

# Every flag of diffusers' examples/textual_inversion/textual_inversion.py, with a value.
REFERENCE_FLAGS = {
    "--pretrained_model_name_or_path": "some/model",
    "--revision": "main",
    "--variant": "fp16",
    "--tokenizer_name": "some/tokenizer",
    "--train_data_dir": "photos",
    "--placeholder_token": "<cat-toy>",
    "--initializer_token": "toy",
    "--learnable_property": "style",
    "--num_vectors": "3",
    "--repeats": "50",
    "--output_dir": "out",
    "--seed": "7",
    "--resolution": "768",
    "--center_crop": None,
    "--train_batch_size": "2",
    "--num_train_epochs": "9",
    "--max_train_steps": "1234",
    "--gradient_accumulation_steps": "4",
    "--gradient_checkpointing": None,
    "--learning_rate": "5e-4",
    "--scale_lr": None,
    "--lr_scheduler": "cosine_with_restarts",
    "--lr_warmup_steps": "10",
    "--lr_num_cycles": "2",
    "--dataloader_num_workers": "2",
    "--adam_beta1": "0.8",
    "--adam_beta2": "0.99",
    "--adam_weight_decay": "0.0",
    "--adam_epsilon": "1e-6",
    "--push_to_hub": None,
    "--hub_token": "hf_token",
    "--hub_model_id": "me/cat-toy",
    "--logging_dir": "tb",
    "--mixed_precision": "bf16",
    "--allow_tf32": None,
    "--report_to": "tensorboard",
    "--validation_prompt": "a <cat-toy> backpack",
    "--num_validation_images": "2",
    "--validation_steps": "50",
    "--validation_epochs": "3",
    "--local_rank": "0",
    "--checkpointing_steps": "250",
    "--checkpoints_total_limit": "2",
    "--resume_from_checkpoint": "latest",
    "--enable_xformers_memory_efficient_attention": None,
    "--save_steps": "100",
    "--save_as_full_pipeline": None,
    "--no_safe_serialization": None,
}


# Every flag of diffusers' examples/textual_inversion/textual_inversion_sdxl.py (read at diffusers
# 58eb52c): the SD script's, less --tokenizer_name, --validation_epochs and --no_safe_serialization,
# plus --use_8bit_adam.
SDXL_REFERENCE_FLAGS = (
    "--save_steps", "--save_as_full_pipeline", "--num_vectors", "--pretrained_model_name_or_path", "--revision",
    "--variant", "--train_data_dir", "--placeholder_token", "--initializer_token", "--learnable_property",
    "--repeats", "--output_dir", "--seed", "--resolution", "--center_crop", "--train_batch_size",
    "--num_train_epochs", "--max_train_steps", "--gradient_accumulation_steps", "--gradient_checkpointing",
    "--learning_rate", "--scale_lr", "--lr_scheduler", "--lr_warmup_steps", "--lr_num_cycles",
    "--dataloader_num_workers", "--use_8bit_adam", "--adam_beta1", "--adam_beta2", "--adam_weight_decay",
    "--adam_epsilon", "--push_to_hub", "--hub_token", "--hub_model_id", "--logging_dir", "--mixed_precision",
    "--allow_tf32", "--report_to", "--validation_prompt", "--num_validation_images", "--validation_steps",
    "--local_rank", "--checkpointing_steps", "--checkpoints_total_limit", "--resume_from_checkpoint",
    "--enable_xformers_memory_efficient_attention",
)  # fmt: skip
FLAG_VALUES = {**REFERENCE_FLAGS, "--use_8bit_adam": None}


def reference_argv(flags) -> list[str]:
    argv = []
    for flag in flags:
        value = FLAG_VALUES[flag]
        argv += [flag] if value is None else [flag, value]
    return argv


def test_every_flag_of_the_diffusers_script_is_accepted_with_its_meaning():
    argv = []
    for flag, value in REFERENCE_FLAGS.items():
        argv += [flag] if value is None else [flag, value]
    args = ti.parse_args(argv)
    for flag, value in REFERENCE_FLAGS.items():
        got = getattr(args, flag.removeprefix("--"))
        if value is None:
            assert got is True, flag
        elif flag == "--validation_prompt":
            assert got == [value]  # repeatable here; one prompt reads as before
        else:
            assert str(got) == value or got == type(got)(value), (flag, got)


def test_every_flag_of_the_diffusers_sdxl_script_is_accepted():
    assert (len(REFERENCE_FLAGS), len(SDXL_REFERENCE_FLAGS)) == (48, 46)  # the two scripts' counts
    args = ti.parse_args(reference_argv(SDXL_REFERENCE_FLAGS))
    for flag in SDXL_REFERENCE_FLAGS:
        value, got = FLAG_VALUES[flag], getattr(args, flag.removeprefix("--"))
        if value is None:
            assert got is True, flag
        elif flag != "--validation_prompt":
            assert str(got) == value or got == type(got)(value), (flag, got)


def test_8bit_adam_is_accepted_and_says_in_one_line_why_it_does_nothing(caplog):
    required = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--placeholder_token", "<x>"]
    with caplog.at_level("WARNING", logger="textual_inversion"):
        ti.parse_args([*required, "--initializer_token", "a", "--use_8bit_adam"])
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("--use_8bit_adam does nothing here: ") and "\n" not in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="textual_inversion"):
        ti.parse_args([*required, "--initializer_token", "a"])
    assert not caplog.records


def test_the_cat_toy_command_of_the_diffusers_docs_parses_unchanged():
    command = """
      --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5
      --train_data_dir=./cat --learnable_property="object" --placeholder_token="<cat-toy>"
      --initializer_token="toy" --resolution=512 --train_batch_size=1 --gradient_accumulation_steps=4
      --max_train_steps=3000 --learning_rate=5.0e-04 --scale_lr --lr_scheduler="constant"
      --lr_warmup_steps=0 --push_to_hub --output_dir="textual_inversion_cat"
    """
    args = ti.parse_args(shlex.split(command))
    assert (args.train_batch_size, args.gradient_accumulation_steps, args.max_train_steps) == (1, 4, 3000)
    assert args.learning_rate == 5e-4 and args.scale_lr and args.push_to_hub


def test_defaults_are_the_reference_scripts():
    required = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]
    args = ti.parse_args([*required, "--placeholder_token", "<x>", "--initializer_token", "a"])
    expected = dict(
        learnable_property="object", repeats=100, resolution=512, train_batch_size=16,
        gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=500,
        adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8, save_steps=500,
        checkpointing_steps=500, num_validation_images=4, validation_steps=100, output_dir="text-inversion-model",
    )  # fmt: skip
    assert {k: getattr(args, k) for k in expected} == expected
    plan = plan_for(args, num_images=4)
    assert (plan.num_vectors, plan.max_steps) == (1, 5000)


def test_help_lists_every_flag():
    command = [sys.executable, str(ROOT / "textual_inversion.py"), "--help"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0
    for reference_flag in {*REFERENCE_FLAGS, *SDXL_REFERENCE_FLAGS}:
        assert reference_flag in done.stdout, reference_flag
