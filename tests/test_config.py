"""Presets and typed overrides."""

import pytest

from ssdd.settings import available_presets, parse_overrides
from ssdd.settings import load_config, valid_keys
from ssdd.errors import UserError


def test_every_preset_resolves_and_has_the_common_keys():
    assert "demo" in available_presets()
    for name in available_presets():
        cfg = load_config(name)
        assert cfg.distill.m > 0 and cfg.distill.krr_st.steps > 0 and cfg.distill.batch > 0 and isinstance(cfg.seed, int)


def test_overrides_are_typed():
    cfg = load_config("demo", parse_overrides(["distill.krr_st.steps=7", "distill.krr_st.lr_images=1", "model.widths=[8, 16]",
                                               "distill.flip=false", "data.source=digits"]))
    assert cfg.distill.krr_st.steps == 7 and cfg.distill.krr_st.lr_images == 1.0 and isinstance(cfg.distill.krr_st.lr_images, float)
    assert cfg.model.widths == [8, 16] and cfg.distill.flip is False and cfg.data.source == "digits"


@pytest.mark.parametrize("pair,needle", [
    ("distill.stepz=3", "unknown key 'distill.stepz'"),
    ("distill.krr_st.steps=3.5", "distill.krr_st.steps expects int"),
    ("distill.krr_st.steps=abc", "not a valid int"),
    ("distill.krr_st.steps=0", "must be positive"),
    ("distill.krr_st.pool_reset=sometimes", "must be one of fixed, reference"),
    ("model.widths=[1.5]", "expects int"),
    ("nokey", "expected key=value"),
])
def test_bad_overrides(pair, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        load_config("demo", parse_overrides([pair]))


def test_unknown_key_lists_valid_ones():
    with pytest.raises(UserError) as err:
        load_config(None, {"nope": "1"})
    assert "distill.m" in str(err.value) and "distill.m" in valid_keys()


def test_method_sections_are_declared_by_their_modules_and_assembled():
    """Each ``distill.<name>`` table comes from ``register(name, config=...)`` beside its method or prep;
    ssdd.config names no method, and the whole config is built from what registered."""
    from ssdd import config, settings
    from ssdd.distill import registry

    found = config.sections()
    assert {"krr_st", "experts", "mkdt", "mtt", "dm", "dsa", "kip", "frepo", "kmeans", "naive_bilevel"} <= set(found)
    for name, cls in found.items():
        owner = registry._METHODS.get(name) or registry._PREPS[name]  # a section belongs to a method or prep
        assert owner.needs[0] == f"distill.{name}" and cls.__module__.startswith("ssdd.distill.")
        assert type(getattr(settings.Config().distill, name)) is cls
    with pytest.raises(TypeError, match="lacks the method sections"):
        config.Config()
    with pytest.raises(TypeError, match="after the config was assembled"):
        config.add_section("late", found["dm"])


def test_every_choice_names_a_string_key_of_its_section():
    import dataclasses

    from ssdd import settings

    def walk(obj):
        yield obj
        for f in dataclasses.fields(obj):
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                yield from walk(getattr(obj, f.name))

    for section in walk(settings.Config()):
        for key, allowed in getattr(type(section), "CHOICES", {}).items():
            assert getattr(section, key) in allowed, f"{type(section).__name__}.{key}: its default is not a choice"
