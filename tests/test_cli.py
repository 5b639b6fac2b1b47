"""The `dpa` commands before anything has run: one line saying what to run first, no traceback."""

from __future__ import annotations

from pathlib import Path

from pipelines.cli import main as dpa_main

ROOT = Path(__file__).resolve().parents[1]


def test_show_before_a_run_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no outputs/ here
    assert dpa_main(["show", "--params", str(ROOT / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no comparison yet" in err and "dvc repro" in err and "Traceback" not in err


def test_stage_before_its_inputs_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert dpa_main(["stage", "proxy", "--seed", "0", "--params", str(ROOT / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "world" in err and "Traceback" not in err


def test_mix_before_the_world_says_to_run_the_world_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here
    assert dpa_main(["stage", "mix", "--params", str(ROOT / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "data.root (data/toyworld) does not exist yet" in err and "dvc repro world" in err
    assert "Traceback" not in err
