"""params.yaml validation: the shipped files validate; bad settings name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "conf/profile").glob("*.yaml")))
def test_every_profile_validates(profile):
    p = load_params(PARAMS, {"profile": profile})
    assert p.profile == profile and p.study.arms


def test_paper_profiles_carry_the_paper_settings():
    p = load_params(PARAMS, {"profile": "qwen2.5-7b"})
    assert (p.proxy.lora.r, p.proxy.lora.alpha, p.proxy.lora.dropout) == (256, 512, 0.0)
    assert p.proxy.train.learning_rate == 4e-5 and p.align.train.learning_rate == 2e-3
    assert p.finetune.train.learning_rate == 4e-5 and p.align.train.global_batch_size == 256
    assert p.loss.delta_min == 0.05 and p.loss.delta_max == 0.5


@pytest.mark.parametrize("override, message", [
    ({"proxy.lora.rank": 8}, "unknown key 'proxy.lora.rank'. Did you mean 'r'?"),
    ({"loss.smoothing": "flatt"}, "Did you mean 'flat'?"),
    ({"proxy.lora.r": "big"}, "proxy.lora.r must be of type int"),
    ({"align.train.warmup_ratio": 1.5}, "align.train.warmup_ratio must be in [0, 1)"),
    ({"loss.delta_min": 0.6}, "delta_min < delta_max"),
    ({"study.plain_arms": ["dpa"]}, "belongs in study.proxy_arms"),
    ({"study.plain_arms": ["vanila"]}, "Did you mean 'vanilla'?"),
    ({"align.train.global_batch_size": 30}, "not a multiple of per_device_batch_size"),
    ({"data.captions": [{"name": "x", "path": "/etc/passwd", "image_root": "data/toyworld/images"}]},
     "is outside data.root"),
    ({"runtime.num_processes": 4}, "needs runtime.launcher: accelerate"),
    ({"evaluate.lmu_data": "/tmp/LMUData", "evaluate.benchmarks": [{"name": "m", "kind": "vlmeval", "task": "MMBench"}]},
     "evaluate.lmu_data = '/tmp/LMUData' is outside data.root"),
    ({"evaluate.benchmarks": [{"name": "t", "kind": "builtin_tsv", "path": "/tmp/t.tsv"}]},
     "evaluate.benchmarks[0].path = '/tmp/t.tsv' is outside data.root"),
    ({"evaluate.benchmarks": [{"name": "t", "kind": "builtin_tsv"}]},
     "evaluate.benchmarks[0]: a builtin_tsv benchmark needs 'path'"),
    ({"evaluate.benchmarks": [{"name": "t", "kind": "lmevall", "task": "x"}]}, "Did you mean 'lmeval'?"),
    ({"arms.dpa": {"proxi": True}}, "unknown key 'arms.dpa.proxi'. Did you mean 'proxy'?"),
    ({"arms.dpa": {"proxy": True, "loss": "cmo", "align": False}}, "arms.dpa.proxy is true but align is false"),
    ({"data.captions": [{"name": "x"}]}, "data.captions[0].path is missing"),
    ({"data.captions": [{"name": "x", "path": "data/toyworld/x.json", "image_root": "data/toyworld", "weight": -1}]},
     "data.captions[0].weight must be >= 0 (got -1.0)"),
    ({"proxy.lora.dropout": 1.0}, "proxy.lora.dropout must be in [0, 1)"),
    ({"loss.window": 2}, "loss.window must be an odd number"),
    ({"mix.dedup": "maybe"}, "mix.dedup must be true or false"),
    ({"mix.dedup": "yes"}, "mix.dedup must be true or false (got 'yes')"),
    ({"proxy.lora.r": True}, "proxy.lora.r must be of type int (got True)"),
    ({"proxy.lora.r": "64"}, "proxy.lora.r must be of type int (got '64')"),
    ({"model.llm": 3}, "model.llm must be of type str (got 3)"),
    ({"proxy.train.seed": 3}, "proxy.train.seed is not a setting of params.yaml: each run takes it from study.seeds"),
    ({"loss.kind": "cmo"}, "loss.kind is not a setting of params.yaml"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ParamsError) as err:
        load_params(PARAMS, override)
    assert message in str(err.value)
    assert "params.yaml" in str(err.value) and "Fix:" in str(err.value)


def test_stage_settings_are_dpa_cores():
    """params.yaml's stage sections are dpa_core's settings, checked where they are defined, and a run's
    settings are the section's with the study seed (and finetune's connector rate) set."""
    from dpa_core.errors import SettingError
    from dpa_core.settings import LoraSettings, TrainSettings

    with pytest.raises(SettingError, match=r"^r must be > 0 \(got 0\)\. Fix:"):
        LoraSettings(r=0)
    p = load_params(PARAMS, {"finetune.connector_learning_rate": 1e-4})
    assert isinstance(p.proxy.lora, LoraSettings) and isinstance(p.align.train, TrainSettings)
    run = p.train_settings("finetune", 3)
    assert (run.seed, run.connector_learning_rate, run.learning_rate) == (3, 1e-4, p.finetune.train.learning_rate)
    assert p.train_settings("align", 3).connector_learning_rate is None
    assert p.loss_config("dpa", "align").kind == "cmo" and p.loss_config("vanilla", "align").kind == "vanilla"
    no_cmo_in_align = load_params(PARAMS, {"loss.cmo_in_align": False})
    assert no_cmo_in_align.loss_config("dpa", "align").kind == "vanilla"
    assert no_cmo_in_align.loss_config("dpa", "finetune").kind == "cmo"


def test_unknown_profile_is_named():
    with pytest.raises(ParamsError) as err:
        load_params(PARAMS, {"profile": "qwen7b"})
    assert "unknown profile 'qwen7b'. Did you mean 'qwen2.5-7b'?" in str(err.value)
    assert "conf/profile" in str(err.value) and "Fix:" in str(err.value)


def test_params_yaml_is_conf_composed_by_dvc(tmp_path):
    """The committed params.yaml is what DVC's Hydra composition of conf/ writes (`dvc exp run`)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(tmp_path / "params.yaml", str(ROOT / "conf"), None, "config", "", [])
    assert PARAMS.read_text() == (tmp_path / "params.yaml").read_text(), "run `dpa compose` after editing conf/"
    assert "enabled = true" in (ROOT / ".dvc/config").read_text().split("[hydra]", 1)[1]


def test_overrides_win_over_the_profile():
    p = load_params(PARAMS, {"profile": "smoke", "align.train.max_steps": 7})
    assert p.align.train.max_steps == 7 and p.world.size == "smoke"


# --- params as users write them (issue 15, item 3) ----------------------------------------------------

import shutil  # noqa: E402

from pipelines.cli import main as dpa_main  # noqa: E402
from pipelines.params import parse_override  # noqa: E402

CONF = ROOT / "conf"


def _params_copy(tmp_path, edit=lambda text: text) -> Path:
    dst = tmp_path / "params.yaml"
    dst.write_text(edit(PARAMS.read_text()))
    return dst


@pytest.mark.parametrize("written, value", [("2e-5", 2e-5), ("1e-3", 1e-3), ("5E-4", 5e-4), ("2.0e-05", 2e-5),
                                            ("0.002", 0.002), ("1", 1.0), ("'3e-4'", 3e-4)])
def test_floats_as_users_write_them_in_params_yaml(tmp_path, written, value):
    path = _params_copy(tmp_path, lambda t: t.replace("learning_rate: 0.002", f"learning_rate: {written}", 1))
    p = load_params(path)
    assert p.align.train.learning_rate == value and isinstance(p.align.train.learning_rate, float)


def test_floats_in_a_profile(tmp_path):
    shutil.copytree(CONF, tmp_path / "conf")
    (tmp_path / "conf/profile/mine.yaml").write_text(
        "# @package _global_\nprofile: mine\nproxy:\n  train: {learning_rate: 4e-5}\nfinetune:\n  train:\n"
        "    learning_rate: 5E-4\n")
    p = load_params(tmp_path / "params.yaml", {"profile": "mine"})
    assert (p.proxy.train.learning_rate, p.finetune.train.learning_rate) == (4e-5, 5e-4)
    assert p.profile == "mine"


def test_a_profile_names_itself(tmp_path):
    """A profile without `profile: <name>` is refused (it used to run tagged as the toy profile)."""
    shutil.copytree(CONF, tmp_path / "conf")
    (tmp_path / "conf/profile/mine.yaml").write_text("# @package _global_\nmix: {total: 40}\n")
    with pytest.raises(ParamsError, match=r"profile is missing\. Fix: each conf/profile/<name>\.yaml sets"):
        load_params(tmp_path / "params.yaml", {"profile": "mine"})


@pytest.mark.parametrize("text, value", [
    ("proxy.train.learning_rate=2e-5", 2e-5), ("proxy.train.learning_rate=1e-3", 1e-3),
    ("proxy.train.learning_rate=5E-4", 5e-4), ("proxy.train.learning_rate=0.0001", 1e-4),
    ("proxy.lora.r=64", 64), ("study.seeds=[0,1,2]", [0, 1, 2]), ("mix.total=null", None),
    ("mix.dedup=false", False), ("study.plain_arms=[vanilla,cal]", ["vanilla", "cal"]), ("profile=smoke", "smoke"),
])
def test_dpa_set_values(text, value):
    key, parsed = parse_override(text)
    p = load_params(PARAMS, {key: parsed})
    got = p.to_dict()
    for k in key.split("."):
        got = got[k]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, key, value", [
    ("proxy.train.learning_rate=2e-5", "proxy.train.learning_rate", 2e-5),
    ("align.train.learning_rate=1e-3", "align.train.learning_rate", 1e-3),
    ("finetune.train.learning_rate=5E-4", "finetune.train.learning_rate", 5e-4),
    ("loss.delta_min=0.1", "loss.delta_min", 0.1),
    ("proxy.lora.r=64", "proxy.lora.r", 64),
    ("study.seeds=[0,1,2]", "study.seeds", [0, 1, 2]),
    ("study.plain_arms=[vanilla,cal,cmo_only]", "study.plain_arms", ["vanilla", "cal", "cmo_only"]),
    ("mix.total=null", "mix.total", None),
    ("mix.total=40", "mix.total", 40),
    ("mix.dedup=false", "mix.dedup", False),
    ("profile=smoke", "profile", "smoke"),
    ("evaluate.limit=24", "evaluate.limit", 24),
])
def test_dvc_exp_run_set_values(tmp_path, override, key, value):
    """What `dvc exp run -S` writes into params.yaml (DVC's own code, hydra grammar, ruamel dump)
    is read back as the value the user meant."""
    from dvc.utils.hydra import apply_overrides

    path = _params_copy(tmp_path)
    apply_overrides(path, [override])
    got = load_params(path).to_dict()
    for k in key.split("."):
        got = got[k]
    assert got == value and type(got) is type(value)


def test_prefect_parameters_take_floats_as_text_or_numbers(tmp_path):
    from pipelines.prefect_flow import apply_params, build_overrides

    shutil.copytree(CONF, tmp_path / "conf")
    for given in ("2e-5", 2e-5):
        ov = build_overrides(overrides={"proxy.train.learning_rate": given, "finetune": {"train": {"learning_rate": "5E-4"}}})
        apply_params(tmp_path, ov)
        p = load_params(tmp_path / "params.yaml")
        assert (p.proxy.train.learning_rate, p.finetune.train.learning_rate) == (2e-5, 5e-4)


def test_duplicate_key_is_rejected_by_dpa_validate(tmp_path, capsys):
    path = _params_copy(tmp_path, lambda t: t.replace("world:\n  size: default\n  seed: 0\n",
                                                      "world:\n  size: default\n  seed: 0\n  seed: 1\n", 1))
    line = path.read_text().splitlines().index("  seed: 1") + 1
    assert dpa_main(["validate", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"duplicate key 'seed' at line {line} (first at line {line - 1})" in err and str(path) in err
    assert "Fix:" in err and len(err.strip().splitlines()) == 1
