import pytest

from ssae_ray.config import PRESETS, ConfigError, load_config, preset_names


def test_every_preset_loads():
    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg.sae.hooks, name


def test_overrides_and_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train: {lam: 7}\nsweep: {lams: [1, 2]}\n")
    cfg = load_config("tiny", y, ["train.lr=0.01", "sweep.tilts=[0, 500]", "train.l0_band=[10, 20]"])
    assert cfg.train.lam == 7.0 and isinstance(cfg.train.lam, float)
    assert cfg.train.lr == 0.01
    assert cfg.sweep.lams == (1.0, 2.0)
    assert cfg.sweep.tilts == (0.0, 500.0)
    assert cfg.train.l0_band == (10.0, 20.0)
    with pytest.raises(AttributeError):
        cfg.train.lam = 3  # frozen


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lamm=3", ["unknown config key", "train.lamm"]),
        ("train.lam=abc", ["train.lam", "expected a number"]),
        ("train.steps=1.5", ["train.steps", "integer"]),
        ("bogus.x=1", ["unknown config key", "bogus"]),
        ("novalue", ["section.key=value"]),
    ],
)
def test_bad_overrides_are_clear(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "missing.yaml")


def test_replace_and_yaml_roundtrip():
    cfg = load_config("local")
    c2 = cfg.replace(train={"lam": 9.0})
    assert c2.train.lam == 9.0 and c2.train.lr == cfg.train.lr
    import yaml

    from ssae_ray.config import from_dict

    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
