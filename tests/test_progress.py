"""A training stage's terminal output: one progress bar with the loss in its postfix, no per-step
dicts (those go to the history and MLflow)."""

from __future__ import annotations

import json

from dpa_core.stages import LoraSettings, proxy_pretrain
from dpa_core.trainer import TrainSettings
from tests.tiny_models import make_llm


def test_training_prints_one_bar_and_no_log_dicts(tmp_path, capsys):
    llm = make_llm(tmp_path / "llm")
    (tmp_path / "text.jsonl").write_text("\n".join(
        json.dumps({"id": f"t{i}", "text": f"a red circle number {i} on the left"}) for i in range(8)))
    settings = TrainSettings(learning_rate=1e-2, max_steps=3, global_batch_size=2, per_device_batch_size=2,
                             warmup_ratio=0.0, save_steps=0)
    res = proxy_pretrain(llm, tmp_path / "text.jsonl", tmp_path / "proxy" / "seed0", lora=LoraSettings(r=4, alpha=8),
                         settings=settings)
    out = capsys.readouterr()
    printed = out.out + out.err
    assert "proxy/seed0: 100%" in printed and "3/3" in printed  # the bar: stage/run (the out dir), steps
    last_loss = [r for r in res.history if "loss" in r][-1]["loss"]
    assert f"loss={last_loss:.4f}" in printed  # the latest loss in its postfix
    assert "{'loss'" not in printed and "'train_runtime'" not in printed  # no per-step / summary dicts
    assert len([r for r in res.history if "loss" in r]) == 3  # ... which are all in the history
