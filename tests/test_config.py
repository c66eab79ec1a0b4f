"""Config loading: defaults, YAML + dotted overrides, strict keys and types, round trip, help table."""

from __future__ import annotations

import dataclasses

import pytest

from flowalign.config import (
    ConfigError,
    SampleConfig,
    describe,
    field,
    load_config,
    save_config,
    to_yaml,
)


@dataclasses.dataclass
class OptimConfig:
    """Optimizer settings (a nested schema used only by these tests)."""

    lr: float = field(1e-3, "Learning rate.")
    betas: list[float] = field([0.9, 0.999], "Adam betas.")
    name: str = field("adamw", "Optimizer.", choices=["adamw", "sgd"])


@dataclasses.dataclass
class RunConfig:
    """A run with a nested group."""

    steps: int = field(10, "Training steps.")
    optim: OptimConfig = field(OptimConfig, "Optimizer settings.")
    eval_every: int | None = field(None, "Evaluate every N steps; null = never.")


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_as_real_python_types():
    cfg = load_config(SampleConfig)
    assert cfg == SampleConfig()
    assert (cfg.num_steps, cfg.sampler, cfg.eta, cfg.dtype) == (None, None, None, "float32")  # None: the model's own
    assert type(cfg.prompts) is list


def test_yaml_file_then_overrides_win(tmp_path):
    path = _write(tmp_path, "num_steps: 8\nsampler: flow-sde\neta: 0.5\nprompts: [a red circle]\n")
    cfg = load_config(SampleConfig, path, ["eta=0.7", "prompts=[a cat,two dogs]", "height=null"])
    assert cfg.num_steps == 8 and cfg.sampler == "flow-sde"  # from the file
    assert cfg.eta == 0.7  # override beats file
    assert cfg.prompts == ["a cat", "two dogs"] and type(cfg.prompts) is list
    assert cfg.height is None


def test_nested_dotted_override_and_dict_source():
    cfg = load_config(RunConfig, {"optim": {"name": "sgd"}}, ["optim.lr=1e-4", "optim.betas=[0.8,0.9]"])
    assert cfg.optim == OptimConfig(lr=1e-4, betas=[0.8, 0.9], name="sgd")
    assert isinstance(cfg.optim, OptimConfig) and cfg.steps == 10


def test_unknown_top_level_key_names_it_lists_valid_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(SampleConfig, None, ["num_step=3"])
    msg = str(e.value)
    assert "'num_step'" in msg and "Did you mean 'num_steps'" in msg and "sampler" in msg


def test_unknown_nested_key_in_file_gives_full_dotted_key(tmp_path):
    path = _write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert "'optim.lrr'" in msg and "Did you mean 'optim.lr'" in msg and "betas" in msg


def test_scalar_for_a_nested_group_is_an_error():
    with pytest.raises(ConfigError, match="optim.*mapping.*lr"):
        load_config(RunConfig, None, ["optim=3"])


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("num_images_per_prompt=abc", "num_images_per_prompt", "int"),
        ("num_steps=abc", "num_steps", "int | None"),
        ("eta=fast", "eta", "float | None"),
        ("seed=null", "seed", "int"),
    ],
)
def test_ill_typed_value_names_key_type_and_value(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(SampleConfig, None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and f"expects {expected}," in msg
    assert override.split("=")[1].replace("null", "None") in msg


def test_ill_typed_nested_list_element():
    with pytest.raises(ConfigError, match=r"'optim\.betas' expects list\[float\]"):
        load_config(RunConfig, None, ["optim.betas=[a,b]"])


@pytest.mark.parametrize("override", ["num_steps", "--num_steps=3", "=3", "prompts=[a,"])
def test_malformed_override_shows_expected_form(override):
    with pytest.raises(ConfigError, match="Malformed override") as e:
        load_config(SampleConfig, None, [override])
    assert "key=value" in str(e.value) or "quote it" in str(e.value)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(SampleConfig, missing)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(RunConfig, None, ["steps=3", "optim.lr=2e-5", "eval_every=5"])
    assert load_config(RunConfig, _write(tmp_path, to_yaml(cfg))) == cfg
    sample = SampleConfig(prompts=["a: colon", "b"], sampler="cps", eta=0.3, height=64, dtype="bfloat16")
    path = save_config(sample, tmp_path / "run" / "config.yaml")
    assert path.is_file() and load_config(SampleConfig, path) == sample


@pytest.mark.parametrize(
    "key, value", [("eta", -1.0), ("num_steps", 0), ("width", 0), ("sampler", "flowsde")]
)
def test_post_init_validation_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"{key}=") as e:
        load_config(SampleConfig, None, [f"{key}={value}"])
    assert "Set it" in str(e.value) or "choose one of" in str(e.value)  # and says how to fix it
    with pytest.raises(ValueError, match=f"{key}="):  # constructing in Python validates too
        SampleConfig(**{key: value})


def test_choices_checked_in_nested_configs():
    with pytest.raises(ConfigError, match=r"optim\.name='sgdd'.*adamw, sgd.*Did you mean 'sgd'"):
        load_config(RunConfig, None, ["optim.name=sgdd"])


def test_describe_lists_every_key_with_type_default_and_help():
    text = describe(SampleConfig)
    for f in dataclasses.fields(SampleConfig):
        assert f.metadata["help"], f"{f.name} has no help"
        line = next(line for line in text.splitlines() if line.startswith(f.name + " "))
        assert f.metadata["help"] in line
    assert "flow-sde" in text and "float | None" in text
    nested = describe(RunConfig)
    assert "optim.lr" in nested and "0.001" in nested and "Learning rate." in nested


def test_field_requires_help_and_copies_mutable_defaults():
    with pytest.raises(ValueError, match="help"):
        field(1, "")
    a, b = RunConfig(), RunConfig()
    a.optim.betas.append(0.5)
    assert b.optim.betas == [0.9, 0.999]


def test_every_shipped_training_config_is_valid():
    """Every YAML under configs/ with a ``task:`` loads into its schema (no unknown or ill-typed keys)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from flowalign.trainers import TASKS

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/*/*.yaml"))
    checked = []
    for path in configs:
        task = OmegaConf.load(path).get("task")
        if task is None:  # accelerate configs
            continue
        assert task in TASKS, f"{path}: unknown task {task!r}"
        load_config(TASKS[task][0], str(path))
        checked.append(path.parent.name)
    assert {"grpo", "crd", "dmd", "flash-dmd", "rg-lcd"} <= set(checked)
