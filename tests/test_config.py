import pytest

from t2i_curate.pipeline.core.config import ConfigError, load_config, resolve_preset


def test_defaults_and_presets_validate():
    for name in ("demo", "datacomp-basic", "laion-high-resolution", "sd-v1", "laion-aesthetics-v2-5plus",
                 "laion-aesthetics-v2-6plus", "laion-aesthetics-v2-6.5plus", "laion-5b-similarity"):
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg.select.rules, name


def test_demo_inherits_datacomp_rules_in_order():
    names = [r.name for r in load_config("demo").select.rules]
    assert names == ["min_shorter_side_200", "max_aspect_3", "caption_over_2_words",
                     "caption_over_5_chars", "min_shorter_side_256", "max_text_area"]


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ndownload:\n  image_sise: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "download.image_sise" in str(e.value) and "unknown key" in str(e.value)
    assert str(p) in str(e.value)


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("download:\n  processes: many\n")
    with pytest.raises(ConfigError, match=r"download\.processes.*many"):
        load_config(str(p))


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("download: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))


def test_overrides_are_typed_and_checked():
    cfg = load_config("demo", ["download.processes=7", "score.scorers=[resolution]"])
    assert cfg.download.processes == 7
    with pytest.raises(ConfigError, match="download.nope"):
        load_config("demo", ["download.nope=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("demo", ["download.processes"])


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="known presets are: .*sd-v1"):
        resolve_preset("no-such-preset")


def test_fingerprint_ignores_parallelism_but_not_outputs():
    a = load_config("demo")
    assert a.fingerprint() == load_config("demo", ["workers=9", "download.processes=9"]).fingerprint()
    assert a.fingerprint() != load_config("demo", ["download.image_size=256"]).fingerprint()
    # selection may change in the same run folder
    assert a.fingerprint() == load_config("demo", ["select.rules=[]"]).fingerprint()
