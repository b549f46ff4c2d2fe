from pathlib import Path

import pytest
import yaml

from neuroplex.config import Config, apply_override, load_config, to_yaml
from neuroplex.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = load_config(None)
    assert cfg == Config()
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    load_config(REPO / "configs" / name)


def test_overrides_parse_values_as_yaml_scalars():
    cfg = load_config(
        None,
        [
            "train.lr=3e-3",
            "train.grad_clip=null",
            "model.stages.0.width=128",
            "data.standardize=false",
            "name=my run",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-3)
    assert cfg.train.grad_clip is None
    assert cfg.model.stages[0].width == 128
    assert cfg.data.standardize is False
    assert cfg.name == "my run"


def test_override_creates_missing_section():
    raw: dict = {}
    apply_override(raw, "train.lr=0.5")
    assert raw == {"train": {"lr": 0.5}}


def test_yaml_file_values_are_overridden(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  epochs: 3\n")
    cfg = load_config(path, ["train.epochs=5"])
    assert (cfg.train.lr, cfg.train.epochs) == (0.1, 5)


# Each bad input: (YAML text or None, overrides, words the one-line message must contain).
BAD = [
    ("train:\n  lr: -1.0\n", [], ["train.lr = -1.0", "greater than 0"]),
    ("train:\n  lrr: 0.1\n", [], ["train.lrr", "unknown key", "did you mean 'lr'"]),
    ("trian:\n  lr: 0.1\n", [], ["trian", "unknown key", "did you mean 'train'"]),
    ("train:\n  batch_size: many\n", [], ["train.batch_size = 'many'", "integer"]),
    ("train:\n  epochs: 0\n", [], ["train.epochs = 0", "greater than or equal to 1"]),
    ("data:\n  val_fraction: 1.5\n", [], ["data.val_fraction = 1.5", "less than 1"]),
    ("data:\n  name: imagenet\n", [], ["data.name = 'imagenet'", "mnist1d"]),
    ("data:\n  name: file\n", [], ["data.path", "missing"]),
    (None, ["model.stages.0.widht=3"], ["model.stages.0.widht", "did you mean 'width'"]),
    (None, ["model.stages.1.width=0"], ["model.stages.1.width = 0", "greater than or equal"]),
    (None, ["model.stages.0.kind=lstm"], ["model.stages.0.kind = 'lstm'", "dense"]),
    (None, ["model.stages=[]"], ["model.stages", "at least 1"]),
    (None, ["model.stages.9.width=3"], ["model.stages", "index 9 is out of range"]),
    (None, ["model.stages.x.width=3"], ["model.stages is a list", "'x' is not an index"]),
    (None, ["train.lr"], ["--set 'train.lr'", "KEY=VALUE"]),
    (None, ["=3"], ["KEY=VALUE"]),
    (None, ["train..lr=3"], ["KEY=VALUE"]),
    (None, ["train.lr.x=3"], ["train.lr is a value"]),
    (None, ["train.betas=[0.9, 1.5]"], ["train.betas.1 = 1.5", "[0, 1)"]),
    (None, ["train.norm=layernorm"], ["train.norm", "unknown key"]),
    (None, ["model.stages.0.activation=swish"], ["model.stages.0.activation = 'swish'", "gelu"]),
    (None, ["model.stages=[{width: 3}]"], ["model.stages.0.kind", "missing"]),
    (None, ["seed=1.5"], ["seed = 1.5", "integer"]),
    (None, ["train.plasticity.kind=sat"], ["train.plasticity.kind = 'sat'", "'rigl'"]),
    (None, ["train.plasticity.every=0"], ["train.plasticity.every = 0", "greater than or equal"]),
    (None, ["train.plasticity.fraction=0"], ["train.plasticity.fraction = 0", "greater than 0"]),
    (None, ["train.plasticity.evry=3"], ["train.plasticity.evry", "did you mean 'every'"]),
    (None, ["train.plasticity.kind=set"], ["train.plasticity", "no sparse stage"]),
    (
        None,
        ["model.stages=[{kind: sparse, wiring: random}]", "train.plasticity.kind=block_set"],
        ["train.plasticity.kind = 'block_set'", "model.stages.0 has a unit-mask wiring"],
    ),
    (
        None,
        ["model.stages=[{kind: sparse, p_inter: 0.1}]", "train.plasticity.kind=hebbian"],
        ["train.plasticity.kind = 'hebbian'", "modular with p_inter > 0", "use kind set"],
    ),
    (None, ["model.stages=[{kind: sparse, p_inter: 1.5}]"], ["p_inter = 1.5", "less than"]),
    (
        None,
        ["model.stages=[{kind: sparse}]", "train.plasticity={}", "train.method=local"]
        + ["train.aux.kind=momentum"],
        ["train.plasticity", "aux.kind momentum"],
    ),
    ("- a\n- b\n", [], ["top level must be a mapping"]),
    ("train: [unclosed\n", [], ["YAML parse error", "line"]),
]


@pytest.mark.parametrize(("text", "overrides", "words"), BAD)
def test_bad_config_names_field_value_and_expectation(tmp_path, text, overrides, words):
    path = write(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.startswith("config error: ")
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_yaml_shows_every_default():
    shown = yaml.safe_load(to_yaml(load_config(None)))
    assert set(shown["train"]) == set(Config().train.model_dump())
    assert shown["model"]["stages"][0]["kind"] == "dense"
