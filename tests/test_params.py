"""params.yaml validation: the shipped files validate; bad settings name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "configs/profiles").glob("*.yaml")))
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
    ({"profile": "qwen7b"}, "unknown profile 'qwen7b'"),
    ({"align.train.global_batch_size": 30}, "not a multiple of per_device_batch_size"),
    ({"data.captions": [{"name": "x", "path": "/etc/passwd", "image_root": "data/toyworld/images"}]},
     "is outside data.root"),
    ({"runtime.num_processes": 4}, "needs runtime.launcher: accelerate"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ParamsError) as err:
        load_params(PARAMS, override)
    assert message in str(err.value)
    assert "params.yaml" in str(err.value) and "Fix:" in str(err.value)


def test_overrides_win_over_the_profile():
    p = load_params(PARAMS, {"profile": "smoke", "align.train.max_steps": 7})
    assert p.align.train.max_steps == 7 and p.world.size == "smoke"
