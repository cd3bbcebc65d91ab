"""Training settings declared once: the CLI, ``--config`` recipes and the checks come from TrainConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from components.common import ConfigError
from components.settings import (
    apply_config_file,
    coerce_text,
    declared,
    flag_of,
    read_config_file,
    settings_table,
    values_from_args,
)
from components.training.cli import build_parser, config_from_args
from components.training.config import EXPERIMENTS, TrainConfig

REQUIRED = ["--train", "t.csv", "--val", "v.csv", "--out", "model"]


def _parse(argv: list[str]):
    parser = build_parser()
    apply_config_file(parser, argv, TrainConfig)
    return parser.parse_args(argv)


def test_every_training_setting_is_declared_with_help_group_and_a_flag_or_a_reason():
    fields = dataclasses.fields(TrainConfig)
    assert [f.name for f in declared(TrainConfig)] == [f.name for f in fields]
    parser_flags = {s for a in build_parser()._actions for s in a.option_strings}
    for f in fields:
        assert f.metadata["help"].strip() and f.metadata["group"], f.name
        assert (flag_of(f) in parser_flags) == f.metadata["cli"], f.name
    # what callers set (never a user): the stage machinery's own switches
    assert {f.name for f in fields if not f.metadata["cli"]} == {"channels_last", "export", "stop_after"}


def test_the_parsers_defaults_are_the_declared_defaults():
    cfg = TrainConfig(**values_from_args(TrainConfig, _parse(REQUIRED)))
    default = TrainConfig(Path("t.csv"), Path("v.csv"), Path("model"))
    assert cfg == default
    # on-by-default switches are turned off by their --no- flag
    off = TrainConfig(**values_from_args(TrainConfig, _parse([*REQUIRED, "--no-amp", "--no-progress"])))
    assert (off.amp, off.progress) == (False, False)


def test_a_recipe_file_sets_settings_and_flags_win(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "train: t.csv\nval: v.csv\nout: model\n"  # the flags' names
        "epochs: 7\nimage-size: 64\nlr: 1\nclasses: [1, 2, 3]\nhead: classification\ntta: true\n"
        "weight_decay: 0.001\n"  # or the fields'
    )
    cfg = config_from_args(_parse(["--config", str(recipe), "--epochs", "9"]))
    assert (cfg.epochs, cfg.image_size, cfg.lr, cfg.classes) == (9, 64, 1.0, (1, 2, 3))
    assert cfg.head == "classification" and cfg.tta is True and cfg.weight_decay == 0.001
    assert cfg.train_csv == Path("t.csv") and cfg.out_dir == Path("model")
    assert isinstance(cfg.lr, float) and isinstance(cfg.train_csv, Path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch: 3\n", "unknown setting 'epoch'; did you mean epochs?"),
        ("epochs: ten\n", "epochs: expected int, got 'ten'"),
        ("epochs: 2.5\n", "epochs: expected int, got 2.5"),
        ("tta: 1\n", "tta: expected bool, got 1"),
        ("head: softmax\n", "head: must be one of ['classification', 'ordinal', 'regression']"),
        ("classes: [1, x]\n", "classes"),
        ("- epochs\n", "expected a mapping of setting: value"),
        ("epochs: [\n", "not valid YAML"),
    ],
)
def test_a_bad_recipe_names_the_file_and_the_setting(tmp_path: Path, text: str, message: str):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_config_file(recipe, TrainConfig)
    assert str(err.value).startswith(f"--config {recipe}") and message in str(err.value)


def test_the_cli_exits_2_on_a_bad_recipe_before_training(tmp_path: Path, capsys):
    from components.training.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("batchsize: 8\n")
    assert main(["--config", str(recipe), *REQUIRED]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'batchsize'; did you mean batch_size or eval_batch_size?" in err
    assert main(["--config", str(tmp_path / "missing.yaml"), *REQUIRED]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_text_values_are_typed_by_the_declaration():
    assert coerce_text("1,2,3", tuple[int, ...], where="--set classes") == (1, 2, 3)
    assert coerce_text("none", int | None, where="x") is None
    assert coerce_text("off", bool, where="x") is False
    with pytest.raises(ConfigError, match=r"--set lr=fast: expected float, got 'fast'"):
        coerce_text("fast", float, where="--set lr=fast")


def test_the_settings_table_lists_every_flag_once_with_its_group():
    table = settings_table(TrainConfig)
    rows = [line for line in table.splitlines()[2:]]
    cli = [f for f in declared(TrainConfig) if f.metadata["cli"]]
    assert len(rows) == len(cli)
    assert all(f"`{flag_of(f)}`" in table for f in cli)
    # the experiments come last, under their own group
    assert rows[-1].startswith(f"| {EXPERIMENTS} |") and "| `--decision` |" in table
