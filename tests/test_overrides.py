"""Tests of scripts/overrides.py: boolean values and command-line keys checked before any work."""

import json

import pytest

from scripts.overrides import OverrideError, check_overrides, flag


def argv(*args: str, config: str = "configs/inference.json") -> list[str]:
    return ["/site-packages/monai/bundle/__main__.py", "run", "--config_file", config, *args]


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("True", True),
        ("false", False),
        ("False", False),
        ("1", True),
        ("0", False),
        (" FALSE ", False),
    ],
)
def test_flag_accepts_the_spellings_of_a_boolean(value, expected):
    assert flag(value, "figures") is expected


@pytest.mark.parametrize("value", ["maybe", "yes", "", 2, -1, 0.5, None, [True]])
def test_flag_refuses_anything_else_naming_the_option(value):
    with pytest.raises(OverrideError, match=r"--figures: expected True or False \(also true/false/1/0\)"):
        flag(value, "figures")


def test_known_keys_nested_keys_and_run_arguments_pass():
    check_overrides(
        argv(
            "--output_dir",
            "x",
            "--dataset_dir=y",
            "--figures",
            "False",
            "--handlers#0#strict",
            "False",
            "--meta_file",
            "configs/metadata.json",
            "--logging_file",
            "configs/logging.conf",
        )
    )
    check_overrides(argv("--max_epochs", "2", "--train#trainer#max_epochs", "3", config="configs/train.json"))
    # several config files: the keys of all of them
    check_overrides(
        argv("--hu_windows", "[[0, 1], [0, 1], [0, 1]]", config="['configs/inference.json','configs/abdomen_ct.json']")
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ouput_dir", "x"], "--ouput_dir: unknown key for configs/inference.json; did you mean --output_dir?"),
        (["--datset_dir", "x"], "did you mean --dataset_dir?"),
        (["--nonsense_key_zzz", "1"], "unknown key for configs/inference.json; see the config files for the keys"),
        (["--run_name", "a"], "--run_name: unknown key for configs/inference.json; it is a setting of MONAI's "
         "experiment tracking: add --tracking mlflow"),  # fmt: skip
        (["--handlers#9#strict", "x"], "--handlers#9#strict: the config files have no handlers#9"),
        (["--write_inverse", "True"], "--write_inverse was renamed: use --write_fixed_to_moving"),
        (["--figures", "maybe"], "--figures: expected True or False"),
        (["--overwrite=yes"], "--overwrite: expected True or False"),
    ],
)
def test_unknown_renamed_and_badly_valued_options_are_refused(args, message):
    with pytest.raises(OverrideError, match=message.replace("?", r"\?").replace("[", r"\[")):
        check_overrides(argv(*args))


def test_other_command_lines_are_not_checked():
    check_overrides(["pytest", "--ouput_dir", "x"])  # configs parsed by tests or MONAI Label
    check_overrides(["/x/monai/bundle/__main__.py", "ckpt_export", "--ouput_dir", "x"])


def test_the_keys_of_every_config_are_known(tmp_path):
    """A key each config defines at top level passes, so the check never refuses a documented option."""
    for name in ("train", "inference", "evaluate", "seg_train", "seg_inference"):
        config = f"configs/{name}.json"
        keys = [k for k in json.load(open(config)) if not k.startswith("_")]
        check_overrides(
            argv(
                *[a for k in keys for a in (f"--{k}", "1" if k not in ("figures", "overwrite") else "0")], config=config
            )
        )
