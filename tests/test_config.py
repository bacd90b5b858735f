"""Typed config: presets, overrides, and the errors a user sees for bad keys and values."""

import pytest

from dydit_dist import config
from dydit_dist.config import ConfigError, load


@pytest.mark.parametrize("name", config.presets())
def test_every_preset_loads(name):
    cfg = load(name)
    assert cfg.model.image_size % (cfg.model.vae_downsample * 2) == 0


def test_overrides_are_typed():
    cfg = load("debug", ["train.lr=3e-4", "train.max_steps=7", "model.dynamic.target_lambda=0.7"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.model.dynamic.target_lambda == pytest.approx(0.7)


def test_int_becomes_float_but_bool_is_not_int():
    assert load("debug", ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.max_steps"):
        load("debug", ["train.max_steps=true"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load("debug", ["model.hiden_size=3"])
    assert "model.hiden_size" in str(err.value) and "image_size" in str(err.value)
    with pytest.raises(ConfigError, match="valid keys in the top level"):
        load("debug", ["modle.name=x"])


def test_wrong_choice_lists_choices():
    with pytest.raises(ConfigError, match=r"sample.sampler='euler'.*'ddpm'"):
        load("debug", ["sample.sampler=euler"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        load("debug", ["deepspeed.zero_stage=4"])


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="DiT-XL/2"):
        load("debug", ["model.name=DiT-XXL/2"])


def test_image_size_must_divide_by_vae_and_patch():
    with pytest.raises(ConfigError, match=r"model.image_size=260 .* 8 x 2 = 16"):
        load("dit_xl2_256", ["model.image_size=260"])


def test_global_batch_must_divide_by_workers_and_micro_batch():
    with pytest.raises(ConfigError, match=r"global_batch_size=10 .* 2 x 4 = 8"):
        load("debug", ["train.global_batch_size=10"])
    cfg = load("debug", ["train.global_batch_size=16"])
    assert cfg.grad_accumulation == 2


def test_yaml_path_with_base(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: debug\ntrain:\n  max_steps: 3\n")
    cfg = load(str(path), ["sample.steps=5"])
    assert cfg.train.max_steps == 3 and cfg.sample.steps == 5 and cfg.model.name == "debug"


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="debug"):
        load("no_such_preset")


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load("pixart_xl2_512")
    assert config.from_dict(cfg.to_dict()) == cfg
    config.save(cfg, str(tmp_path / "config.yaml"))
    assert load(str(tmp_path / "config.yaml")) == cfg


def test_run_job_exit_status_and_messages(capsys):
    from dydit_dist.cli import run_job

    assert run_job("sample", lambda: "s3://b/runs/x/samples: 8 samples", (ConfigError,)) == 0
    assert capsys.readouterr().out == "s3://b/runs/x/samples: 8 samples\n"

    def bad_input():
        raise ConfigError("train.global_batch_size=6 is not a multiple of 4")

    assert run_job("finetune", bad_input, (ConfigError,)) == 2
    captured = capsys.readouterr()
    assert captured.err == "finetune: train.global_batch_size=6 is not a multiple of 4\n" and captured.out == ""

    def bug():
        raise KeyError("not an input error")

    with pytest.raises(KeyError):  # an error the job does not name is a bug: it propagates
        run_job("finetune", bug, (ConfigError,))


def test_method_options_are_typed_sections_checked_at_load():
    cfg = load("debug", ["sample.method=fora", "sample.fora.interval=4"])
    assert cfg.sample.method_options.interval == 4
    assert load("debug", ["sample.method=dydit", "model.method=dydit"]).sample.method_options is None
    with pytest.raises(ConfigError, match=r"unknown config key 'sample.at_edm.ration'; did you mean 'sample.at_edm.ratio'\? valid keys .*ratio"):
        load("debug", ["sample.method=at_edm", "sample.at_edm.ration=0.3"])
    with pytest.raises(ConfigError, match=r"sample.at_edm.ratio=1.5 is outside its allowed range \[0, 1\)"):
        load("debug", ["sample.at_edm.ratio=1.5"])
    with pytest.raises(ConfigError, match="sample.eb_cache.schedule has 50 steps but sample.steps=10"):
        load("debug", ["sample.method=eb_cache"])
    with pytest.raises(ConfigError, match=r"model.dynamic.target_lambda=1.5 is outside its allowed range \(0, 1\]"):
        load("debug", ["model.dynamic.target_lambda=1.5"])


def test_the_network_variant_is_one_knob():
    """model.method chooses the network; a sampling method that needs another variant is refused."""
    with pytest.raises(ConfigError, match=r"sample.method='dydit' runs a network with model.method in \['dydit'\]"):
        load("debug", ["sample.method=dydit"])
    with pytest.raises(ConfigError, match=r"sample.method='flexdit' runs .* \['flexdit'\], got model.method='dydit'"):
        load("debug", ["model.method=dydit", "sample.method=flexdit"])
    assert load("debug", ["model.method=dydit", "sample.method=eb_cache", "sample.eb_cache.schedule='0202020202'"])


@pytest.mark.parametrize("text, message", [
    ("_base_: 5\n", r"_base_ must be one preset name or YAML path \(a string\), got 5"),
    ("_base_: [debug]\n", r"_base_ must be one preset name or YAML path \(a string\), got \['debug'\]"),
    ("_base_: nosuch\n", r"config 'nosuch' \(the _base_ of .*mine.yaml\) is neither a YAML file nor a preset"),
    ("_base_: other/nosuch.yaml\n", r"config file other/nosuch.yaml \(the _base_ of .*mine.yaml\) not found"),
])
def test_a_bad_base_names_the_file_that_holds_it(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(str(path))


def test_a_config_path_that_is_not_a_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml not found$"):
        load(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="config file nope.yml not found"):  # a YAML name, no folder
        load("nope.yml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"folder.yaml is a folder; expected a YAML file"):
        load(str(tmp_path / "folder.yaml"))
    with pytest.raises(ConfigError, match=r"is a folder; expected a YAML file"):
        load(str(tmp_path))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  lr: 1e-4 # \u00e9t\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml is not a UTF-8 text file \(byte 20"):
        load(str(latin))


def test_an_override_of_a_string_field_keeps_its_text(tmp_path):
    cfg = load("debug", ["storage.run=2024", "sample.eb_cache.schedule=0202020202", "data.tokenizer=1e5",
                         "sample.steps=10"])
    assert cfg.storage.run == "2024" and cfg.sample.eb_cache.schedule == "0202020202"
    assert cfg.data.tokenizer == "1e5" and cfg.sample.steps == 10  # other types are YAML's, as before
    assert load("debug", ["storage.run='0202'"]).storage.run == "0202"  # quotes kept by the shell still work
    cleared = load("debug", ["data.tokenizer=null", "model.checkpoint="])
    assert cleared.data.tokenizer is None and cleared.model.checkpoint is None
    path = tmp_path / "mine.yaml"  # in a YAML file, its types are the author's: quoting is the fix
    path.write_text("_base_: debug\nstorage:\n  run: 2024\n")
    with pytest.raises(ConfigError, match=r"storage.run=2024 must be of type str, got int \(quote it in the YAML "
                                          r"file: run: '...'\)"):
        load(str(path))


def test_an_empty_override_or_a_list_without_brackets():
    with pytest.raises(ConfigError, match=r"storage.run must not be empty \(got 'storage.run='\)"):
        load("debug", ["storage.run="])
    with pytest.raises(ConfigError, match=r"sample.steps must not be empty"):
        load("debug", ["sample.steps="])
    with pytest.raises(ConfigError, match=r"eval.methods='static' must be a list, e.g. eval.methods=\[static\]"):
        load("debug", ["eval.methods=static"])


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown config key 'train.max_step'; did you mean 'train.max_steps'? valid keys"),
    ("trian.max_steps=3", "unknown config key 'trian'; did you mean 'train'? valid keys in the top level"),
    ("model.dynamic.target_lamda=0.5", "did you mean 'model.dynamic.target_lambda'?"),
    ("eval.metrics=[fid,", "override 'eval.metrics=[fid,': its value is no YAML"),
    ('sample.steps="x', "override 'sample.steps=\"x': its value is no YAML"),
])
def test_a_mistyped_override_is_named_with_what_was_meant(override, message):
    with pytest.raises(ConfigError) as err:
        load("debug", [override])
    assert message in str(err.value)


def test_multi_scale_pixart_is_refused_when_the_config_is_built():
    """PixArtMS-XL/2 (1024 px) needs per-sample image size and aspect-ratio conditions that neither the sampler
    nor the data pass: its sample job was planned by the preflight, then every actor failed with a message
    about fine-tuning."""
    with pytest.raises(ConfigError, match=r"model.name='PixArtMS-XL/2': multi-scale PixArt \(1024 px\) is not "
                                          r"supported by the jobs: its sampling needs per-sample image size"):
        load("pixart_xl2_512", ["model.name=PixArtMS-XL/2", "model.image_size=1024"])


def test_endpoint_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(ConfigError) as err:
        load("debug", ["storage.endpoint_url=http://AKIACANARY:CanarySecret0001@127.0.0.1:9000"])
    assert "put the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert "AKIACANARY" not in str(err.value) and "CanarySecret" not in str(err.value)
    assert load("debug", ["storage.endpoint_url=http://127.0.0.1:9000"]).storage.endpoint_url == "http://127.0.0.1:9000"
