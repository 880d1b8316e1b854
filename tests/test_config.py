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


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lam=-1", ["train.lam=-1.0", "must be >= 0"]),
        ("train.lr=0", ["train.lr=0.0", "must be > 0"]),
        ("train.tilt_mode=exp", ["train.tilt_mode=exp", "raw, scaled"]),
        ("train.lam=.nan", ["train.lam", "finite"]),
        ("retrieval.index_type=hnsw", ["retrieval.index_type", "flat, ivf, ivfpq"]),
        ("sweep.strategies=[dense, bm2]", ["sweep.strategies", "element 1 (bm2)", "dense, bm25"]),
        ("sweep.l0_range=[140, 60]", ["sweep.l0_range", "hi > lo"]),
        ("sweep.lams=[]", ["sweep.lams", "must not be empty"]),
        ("sae.hooks=[blocks.1.resid_post]", ["'blocks.1.resid_post' is not a hook point", "hook_resid_post"]),
        ("sae.hooks=[blocks.1.hook_resid_post, blocks.1.hook_resid_post]", ["sae.hooks", "duplicates"]),
        ("sweep.hooks=[blocks.0.hook_mlp_out]", ["sweep.hooks", "not among sae.hooks"]),
        ("corpus.test_fraction=1", ["corpus.test_fraction=1.0", "(0, 1)"]),
        ("eval.ci_level=95", ["eval.ci_level", "(0, 1)"]),
        ("autointerp.backend=claud", ["autointerp.backend", "claude, offline"]),
        ("autointerp.base_url=localhost:8080", ["autointerp.base_url", "http(s)://"]),
        ("shift.dataset=bib", ["shift.dataset", "bias_in_bios"]),
        ("model.device=gpu", ["model.device=gpu", "cuda"]),
        ("train.pretrain_tokens=0", ["train.pretrain_tokens=0", ">= 1"]),
    ],
)
def test_values_are_checked_at_load(override, words):
    """Ranges, choices and hook-name syntax are refused when the config is loaded, naming the key."""
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_defaults_and_presets_pass_the_value_checks():
    from ssae_ray.config import CHECKS, Config, from_dict

    assert from_dict({}) == Config()
    for name in PRESETS:
        load_config(name)
    # every rule names a real key (a typo in the table would silently check nothing)
    import dataclasses

    def keys(cls: type, where: str = "") -> set[str]:  # nested sections too (dashboard.neuronpedia.*)
        out = set()
        for f in dataclasses.fields(cls):
            out.add(where + f.name)
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                out |= keys(f.default_factory, f"{where}{f.name}.")
        return out

    assert set(CHECKS) <= keys(Config), sorted(set(CHECKS) - keys(Config))


def test_a_field_can_carry_its_own_rule():
    """New fields may add a rule with `field(metadata={"check": ...})` instead of a CHECKS line."""
    from dataclasses import dataclass, field

    from ssae_ray.config import _build, at_least

    @dataclass(frozen=True)
    class Section:
        n: int = field(default=1, metadata={"check": at_least(1)})

    assert _build(Section, {"n": 3}, "sec").n == 3
    with pytest.raises(ConfigError, match=r"sec.n=0: must be >= 1"):
        _build(Section, {"n": 0}, "sec")


def test_malformed_yaml_is_one_line_naming_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  lam: 2\n   steps: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", y)
    msg = str(e.value)
    assert "\n" not in msg and "bad.yaml" in msg and "not valid YAML at line" in msg
    with pytest.raises(ConfigError, match="override 'sweep.lams=\\[1, 2' is not valid YAML"):
        load_config("tiny", overrides=["sweep.lams=[1, 2"])


@pytest.mark.parametrize(
    "key, why",
    [
        ("train.skip_first_position=false", "position 0 is always left out"),
        ("train.use_activation_cache=false", "always train from the activation cache"),
        ("train.shuffle_buffer_batches=8", "full seeded permutation per epoch"),
    ],
)
def test_settings_that_did_nothing_are_gone_with_a_reason(key, why):
    from ssae_ray.config import TrainConfig

    name = key.split("=")[0].split(".")[1]
    assert not hasattr(TrainConfig(), name)
    with pytest.raises(ConfigError, match=f"config key 'train.{name}' was removed: .*{why}"):
        load_config("tiny", overrides=[key])
