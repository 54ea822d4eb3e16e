"""Config schema: defaults, overrides, and errors that name the offending key."""
import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.training.config import (SECTIONS, DataConfig, apply_overrides, build_schedule,
                                            load_config, parse_config)

BASE = {
    "model": {"name": "small_resnet", "options": {"width": 8}},
    "data": {"source": "digits", "image_size": 16, "resize_shorter": 16},
    "schedule": {"epochs": 4, "batch": 16, "lr": 0.1, "momentum": 0.9,
                 "decay": {"type": "step", "milestones": [2], "factor": 0.5}},
    "optimizer": {"name": "lars", "weight_decay": "5e-5"},
    "train": {"max_per_rank_batch": 8, "seed": 3},
    "output": {"dir": "runs/x"},
}


def parsed(**changes):
    cfg = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    return parse_config(cfg)


def test_valid_config_fills_defaults():
    cfg = parse_config(BASE)
    assert cfg.model.options == {"width": 8} and cfg.model.num_classes is None
    assert cfg.optimizer.weight_decay == 5e-5  # PyYAML's "5e-5" string is read as a float
    assert cfg.optimizer.exclude_bn_and_bias is True and cfg.optimizer.nesterov is None
    assert cfg.data.crop_scale == [0.08, 1.0] and cfg.data.workers == 4
    assert cfg.train.max_per_rank_batch == 8 and cfg.train.eval_every == 1
    assert cfg.output.tensorboard is True
    assert (cfg.optimizer.momentum_correction, cfg.optimizer.denominator) == (True, "separate")
    assert (cfg.train.max_skipped_steps, cfg.train.stall_timeout_s) == (20, 300.0)
    again = parse_config(cfg.to_dict())  # the resolved config round-trips
    assert again == cfg


@pytest.mark.parametrize("mapping,key,message", [
    ({**BASE, "trainer": {}}, "trainer", "unknown section"),
    ({k: v for k, v in BASE.items() if k != "schedule"}, "schedule", "is required"),
    ({k: v for k, v in BASE.items() if k != "model"}, "model.name", "is required"),
    ({**BASE, "model": {"options": {}}}, "model.name", "is required"),
    ({**BASE, "model": {"name": "resnet51"}}, "model.name", "unknown model"),
    ({**BASE, "model": {"name": "small_resnet", "options": {"depth": 3}}}, "model.options.depth",
     "takes no such option"),
    ({**BASE, "model": {"name": "small_resnet", "options": {"width": 8.5}}}, "model.options.width",
     "must be an integer"),
    ({**BASE, "model": {"name": "small_resnet", "options": {"zero_init_residual": 1}}},
     "model.options.zero_init_residual", "must be true or false"),
    ({**BASE, "data": "folder"}, "data", "must be a mapping"),
    ({**BASE, "optimizer": {"momentum": 0.9}}, "optimizer.momentum", "schedule.momentum"),
    ({**BASE, "train": {"epochs": 90}}, "train.epochs", "schedule.epochs"),
    ({**BASE, "schedule": {**BASE["schedule"], "batch": "big"}}, "schedule.batch", "number"),
    ({**BASE, "schedule": {**BASE["schedule"], "epoch": 3}}, "schedule.epoch", "unknown key"),
])
def test_errors_name_the_key(mapping, key, message):
    with pytest.raises(ConfigError) as info:
        parse_config(mapping)
    assert info.value.key == key
    assert message in str(info.value)
    assert str(info.value).startswith(f"{key}: ")


@pytest.mark.parametrize("change,key", [
    ({"data__source": "hdf5"}, "data.source"),
    ({"data__image_size": 0}, "data.image_size"),
    ({"data__image_size": True}, "data.image_size"),
    ({"data__resize_shorter": 8}, "data.resize_shorter"),
    ({"data__mean": [0.5, 0.5]}, "data.mean"),
    ({"data__std": [0.5, 0.0, 0.5]}, "data.std"),
    ({"data__stats": "custom"}, "data.mean"),
    ({"data__crop_scale": [0.5, 1.5]}, "data.crop_scale"),
    ({"data__crop_ratio": [1.2]}, "data.crop_ratio"),
    ({"data__num_samples": 100}, "data.num_samples"),  # only for synthetic data
    ({"data__train_list": "train.txt"}, "data.train_list"),  # only for file lists
    ({"data__flip": "yes"}, "data.flip"),
    ({"optimizer__name": "adam"}, "optimizer.name"),
    ({"optimizer__weight_decay": -1}, "optimizer.weight_decay"),
    ({"optimizer__trust_coefficient": 0}, "optimizer.trust_coefficient"),
    ({"train__max_per_rank_batch": 0}, "train.max_per_rank_batch"),
    ({"train__precision": "fp8"}, "train.precision"),
    ({"train__log_every": 0}, "train.log_every"),
    ({"train__seed": 1.5}, "train.seed"),
    ({"output__dir": ""}, "output.dir"),
    ({"output__plots": None}, "output.plots"),
    ({"optimizer__denominator": "product"}, "optimizer.denominator"),
    ({"optimizer__momentum_correction": "no"}, "optimizer.momentum_correction"),
    ({"train__max_skipped_steps": -1}, "train.max_skipped_steps"),
    ({"train__stall_timeout_s": -5}, "train.stall_timeout_s"),
])
def test_bad_values(change, key):
    with pytest.raises(ConfigError) as info:
        parsed(**change)
    assert info.value.key == key


def test_source_specific_requirements():
    folder = copy.deepcopy(BASE)
    folder["data"] = {"source": "folder"}
    with pytest.raises(ConfigError, match=r"^data\.path: is required for data.source folder"):
        parse_config(folder)
    folder["data"] = {"source": "filelist", "path": "/d", "train_list": "t.txt"}
    with pytest.raises(ConfigError, match=r"^data\.val_list: is required"):
        parse_config(folder)
    folder["data"] = {"source": "synthetic", "num_samples": 1000, "num_classes": 10}
    assert parse_config(folder).data.num_samples == 1000


@settings(max_examples=40, deadline=None)
@given(section=st.sampled_from(sorted(SECTIONS)),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_any_unknown_key_is_named(section, key):
    mapping = copy.deepcopy(BASE)
    mapping.setdefault(section, {})
    known = {"model": {"name", "num_classes", "options"}}.get(section)
    if known is None:
        known = set(SECTIONS[section].__dataclass_fields__)
    if key in known or f"{section}.{key}" in ("optimizer.momentum", "optimizer.lr"):
        return
    mapping[section][key] = 1
    with pytest.raises(ConfigError) as info:
        parse_config(mapping)
    assert info.value.key == f"{section}.{key}"


def test_overrides_parse_yaml_values_and_create_mappings():
    out = apply_overrides(BASE, ["train.seed=7", "optimizer.weight_decay=1.0e-4",
                                 "schedule.decay={type: constant}", "data.mean=[0.1, 0.2, 0.3]",
                                 "model.num_classes=null", "output.extra.deep=x"])
    assert out["train"]["seed"] == 7
    assert out["optimizer"]["weight_decay"] == 1e-4
    assert out["schedule"]["decay"] == {"type": "constant"}
    assert out["data"]["mean"] == [0.1, 0.2, 0.3]
    assert out["model"]["num_classes"] is None
    assert out["output"]["extra"] == {"deep": "x"}
    assert BASE["train"]["seed"] == 3  # the input is not modified
    with pytest.raises(ConfigError, match=r"^output\.extra: unknown key"):
        parse_config(out)
    for bad in ("train.seed", "=3", "train..seed=3"):
        with pytest.raises(ConfigError, match=r"^--set: expected dotted.key=value"):
            apply_overrides(BASE, [bad])
    with pytest.raises(ConfigError, match=r"^train\.seed: is 3, not a mapping"):
        apply_overrides(BASE, ["train.seed.x=1"])


def test_load_config_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(str(path), ["train.seed=11", "schedule.batch=32"])
    assert cfg.train.seed == 11 and cfg.schedule["batch"] == 32
    with pytest.raises(ConfigError, match=r"^train\.seed: must be an integer, got str 'x'"):
        load_config(str(path), ["train.seed=x"])
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^config: .*bad.yaml is not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match=r"^config: cannot read .*missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"^config: .*must hold a mapping"):
        load_config(str(tmp_path / "list.yaml"))


def test_stray_colon_key_is_named_in_files_and_overrides():
    mapping = apply_overrides(copy.deepcopy(BASE), ["train.note={seed:3}"])
    with pytest.raises(ConfigError, match=r"^train\.note\.seed:3: stray key 'seed:3': .*write "
                                          r"'seed: 3'$"):
        parse_config(mapping)
    mapping = yaml.safe_load("schedule: {phases: [{end_epoch: 1}, {end_epoch:2}]}")
    with pytest.raises(ConfigError, match=r"^schedule\.phases\[1\]\.end_epoch:2: stray key"):
        parse_config({**BASE, **mapping})


def test_the_32k_config_runs_algorithm_1_as_written():
    from hvd_largebatch.training.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "jobs/configs/lars_32k_resnet50.yaml"))
    assert cfg.optimizer.name == "lars"
    assert (cfg.optimizer.momentum_correction, cfg.optimizer.denominator) == (False, "separate")


def test_schedule_takes_the_data_size():
    cfg = parse_config(BASE)
    schedule = build_schedule(cfg, 1438)
    assert schedule.dataset_size == 1438
    assert schedule.epoch_batches(0) == [16] * (1438 // 16)
    # a stated size is moved to the real one, keeping the schedule in epochs
    stated = parse_config({**BASE, "schedule": {**BASE["schedule"], "dataset_size": 50_000}})
    moved = build_schedule(stated, 1438)
    assert moved.dataset_size == 1438 and moved.phases == schedule.phases
    # presets carry their own size; ImageNet's goyal_1h on a 100k-image subset
    preset = parse_config({**BASE, "schedule": {"preset": "goyal_1h"}})
    assert build_schedule(preset, None).dataset_size == 1_281_167
    assert build_schedule(preset, 100_000).total_updates == sum(
        100_000 // 8192 for _ in range(90))


def test_data_defaults_are_documented():
    # the module docstring's YAML block parses and gives the dataclass defaults back
    import hvd_largebatch.training.config as config

    doc = config.__doc__
    block = doc[doc.index("    model:"):doc.index("The momentum is part")]
    documented = yaml.safe_load("\n".join(line[4:] for line in block.splitlines()))
    data = documented["data"]
    defaults = DataConfig()
    for key in ("source", "image_size", "crop_scale", "flip", "workers", "prefetch", "stats"):
        expected = getattr(defaults, key)
        assert data[key] == pytest.approx(expected) if isinstance(expected, list) else data[key] == expected, key
    assert set(documented["train"]) == set(config.TrainConfig.__dataclass_fields__)
    assert set(documented["optimizer"]) == set(config.OptimizerConfig.__dataclass_fields__)
    assert set(documented["data"]) == set(config.DataConfig.__dataclass_fields__)
    assert set(documented["output"]) == set(config.OutputConfig.__dataclass_fields__)
