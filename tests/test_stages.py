"""The training stages: what each one trains, merge, a fresh-process load, resume, up-front validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, TrainerCallback

from dpa_core.errors import DPAInputError
from dpa_core.losses import LossConfig
from dpa_core.modeling import build_llava, save_connector
from dpa_core.stages import (DataSource, LoraSettings, ModelPaths, align, finetune, merge, proxy_pretrain,
                             untrained_connector)
from dpa_core.trainer import COMPLETE_MARKER, TrainSettings, mark_complete, prepare_work_dir
from tests.tiny_models import make_llm

# No warmup: with a 3% warmup over 2 steps the first step would have learning rate 0.
SETTINGS = TrainSettings(learning_rate=1e-2, max_steps=2, global_batch_size=2, per_device_batch_size=2,
                         warmup_ratio=0.0, save_steps=0)
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


class Snapshot(TrainerCallback):
    """Parameters of the model being trained, at the start and at the end of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(self) -> set[str]:
        return {n for n in self.before if not torch.equal(self.before[n], self.after[n])}


@pytest.fixture(scope="module")
def world(tiny_paths, tmp_path_factory):
    d = tmp_path_factory.mktemp("stages")
    images = tiny_paths["images"]
    names = sorted(p.name for p in images.glob("*.png"))
    colours = ["red", "blue", "green", "yellow", "purple", "red"]
    caps = [{"id": f"c{i}", "image": n, "conversations": [
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": f"a {colours[i]} circle on the left"}]} for i, n in enumerate(names)]
    inst = [{"id": f"q{i}", "image": n, "conversations": [
        {"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": f"it is {colours[i]}."},
        {"from": "human", "value": "how many?"}, {"from": "gpt", "value": "three."}]} for i, n in enumerate(names)]
    (d / "caps.json").write_text(json.dumps(caps))
    (d / "inst.jsonl").write_text("\n".join(json.dumps(r) for r in inst))
    (d / "text.jsonl").write_text("\n".join(json.dumps({"id": c["id"], "text": c["conversations"][1]["value"]})
                                            for c in caps))
    return {"dir": d, "paths": ModelPaths(tiny_paths["clip"], tiny_paths["llm"]),
            "caps": [DataSource(d / "caps.json", images)], "inst": [DataSource(d / "inst.jsonl", images)],
            "text": d / "text.jsonl", "images": images}


def _is_projector(name: str) -> bool:
    return "multi_modal_projector" in name


def _is_vision(name: str) -> bool:
    return "vision_tower" in name


# --- 3. each stage trains exactly what it should -----------------------------------------------------

@pytest.fixture(scope="module")
def proxy_run(world):
    snap = Snapshot()
    res = proxy_pretrain(world["paths"].llm, world["text"], world["dir"] / "proxy", lora=LORA, settings=SETTINGS,
                         callbacks=[snap])
    return res, snap


def test_proxy_pretrain_trains_lora_only(proxy_run, world):
    res, snap = proxy_run
    lora = {n for n in snap.before if "lora_" in n}
    assert lora and snap.trainable == lora
    # Two steps: lora_B leaves zero at step 1, so lora_A gets a gradient at step 2.
    assert snap.changed() == lora
    out = res.out_dir
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (world["dir"] / "proxy.work").exists()  # the work dir goes once the output is in place
    assert json.loads((out / "metrics.json").read_text())["n_texts"] == 6


@pytest.fixture(scope="module")
def align_run(world):
    snap = Snapshot()
    res = align(world["paths"], world["caps"], world["dir"] / "align", loss=LossConfig("cmo"), settings=SETTINGS,
                callbacks=[snap])
    return res, snap


def test_align_trains_connector_only(align_run):
    res, snap = align_run
    proj = {n for n in snap.before if _is_projector(n)}
    assert len(proj) == 4  # linear_1/linear_2 weight and bias
    assert snap.trainable == proj
    assert snap.changed() == proj  # everything else (vision tower, LLM, lm_head) is bit-identical
    saved = load_file(str(res.out_dir / "connector.safetensors"))
    for name in proj:
        assert torch.equal(saved[name.split("multi_modal_projector.")[1]], snap.after[name])
    assert [r["step"] for r in res.history if "loss" in r] == [1, 2]
    assert any(k.startswith("cmo/") for r in res.history for k in r)  # CMO weight stats are logged


def test_align_against_the_proxy(proxy_run, world):
    proxy_dir = proxy_run[0].out_dir
    snap = Snapshot()
    align(world["paths"], world["caps"], world["dir"] / "align_proxy", loss=LossConfig("vanilla"), settings=SETTINGS,
          proxy_adapter=proxy_dir, callbacks=[snap])
    proj = {n for n in snap.before if _is_projector(n)}
    assert snap.trainable == proj and snap.changed() == proj
    # The LLM it trained against is the proxy: base weight + (alpha / r) * B @ A, from the adapter file.
    adapter = load_file(str(proxy_dir / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(world["paths"].llm)
    checked = 0
    for key, a in adapter.items():
        if "lora_A" not in key:
            continue
        b = adapter[key.replace("lora_A", "lora_B")]
        module = key.split("base_model.model.model.")[1].split(".lora_A")[0]  # e.g. layers.0.self_attn.q_proj
        w_base = base.model.get_parameter(module + ".weight")
        expected = w_base + (LORA.alpha / LORA.r) * (b @ a)
        got = snap.before[f"model.language_model.{module}.weight"]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        assert not torch.equal(got, w_base)
        checked += 1
    assert checked >= 14  # q,k,v,o,gate,up,down in both layers


@pytest.fixture(scope="module")
def ft_lora_run(align_run, world):
    snap = Snapshot()
    res = finetune(world["paths"], align_run[0].out_dir / "connector.safetensors", world["inst"],
                   world["dir"] / "ft_lora", loss=LossConfig("cmo"), settings=SETTINGS, tune="lora", lora=LORA,
                   callbacks=[snap])
    return res, snap


def test_finetune_lora_trains_lora_and_connector(ft_lora_run, align_run):
    res, snap = ft_lora_run
    lora = {n for n in snap.before if "lora_" in n}
    saved_copy = {n for n in snap.before if _is_projector(n) and "modules_to_save" in n}
    assert lora and len(saved_copy) == 4
    assert all("language_model" in n for n in lora)  # LoRA only on the LLM, not on the vision tower
    assert snap.trainable == lora | saved_copy
    assert snap.changed() == lora | saved_copy  # base LLM, vision tower, original connector unchanged
    # The connector it started from is the one the align stage trained.
    connector = load_file(str(align_run[0].out_dir / "connector.safetensors"))
    for n in saved_copy:
        assert torch.equal(snap.before[n], connector[n.split("modules_to_save.default.")[1]])
    adapter = res.out_dir / "adapter"
    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    assert any("multi_modal_projector" in k for k in keys) and any("lora_B" in k for k in keys)
    assert (adapter / "processor_config.json").is_file() or (adapter / "preprocessor_config.json").is_file()


def test_finetune_full_trains_llm_and_connector(align_run, world):
    snap = Snapshot()
    res = finetune(world["paths"], align_run[0].out_dir / "connector.safetensors", world["inst"],
                   world["dir"] / "ft_full", loss=LossConfig("vanilla"), settings=SETTINGS, tune="full",
                   callbacks=[snap])
    vision = {n for n in snap.before if _is_vision(n)}
    assert vision and snap.trainable == set(snap.before) - vision
    changed = snap.changed()
    assert not changed & vision
    matrices = {n for n in snap.before if not _is_vision(n) and snap.before[n].ndim == 2}
    assert matrices <= changed  # every LLM / connector matrix moved
    assert {n for n in snap.before if _is_projector(n)} <= changed
    # The saved model is the trained one.
    saved = LlavaForConditionalGeneration.from_pretrained(res.out_dir / "model")
    for n, p in saved.named_parameters():
        assert torch.equal(p, snap.after[n]), n
    # merge of a fully tuned model is a copy
    merged = merge(world["paths"], res.out_dir, world["dir"] / "merged_full")
    assert merged.metrics == {"merged": False} and (merged.out_dir / "model.safetensors").is_file()


# --- 4./5. merge: same logits as base + adapter; loads and generates without dpa_core ---------------

@pytest.fixture(scope="module")
def merged_dir(ft_lora_run, world):
    return merge(world["paths"], ft_lora_run[0].out_dir, world["dir"] / "merged").out_dir


def _inputs(processor, image: Path):
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "it is red."}]}]
    text = processor.apply_chat_template(msgs)
    return processor(images=Image.open(image).convert("RGB"), text=text, return_tensors="pt")


def test_merged_equals_base_plus_adapter(merged_dir, ft_lora_run, world):
    base, processor = build_llava(world["paths"].vision, world["paths"].llm)
    with torch.no_grad():
        inputs = _inputs(processor, world["images"] / "img0.png")
        plain_logits = base(**inputs).logits
    peft = PeftModel.from_pretrained(base, ft_lora_run[0].out_dir / "adapter").eval()
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = peft(**inputs).logits
        got = merged(**inputs).logits
    assert (got - expected).abs().max() < 1e-4
    assert (expected - plain_logits).abs().max() > 1e-3  # the adapter really changes the model
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_merged_loads_and_generates_without_dpa_core(merged_dir, world, tmp_path):
    script = r"""
import json, sys
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
d, image = sys.argv[1], sys.argv[2]
model = LlavaForConditionalGeneration.from_pretrained(d)
processor = AutoProcessor.from_pretrained(d)
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
inputs = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
print(json.dumps({"dpa": sorted(m for m in sys.modules if m.split(".")[0] == "dpa_core"), "prompt": prompt,
                  "n_image": int((inputs["input_ids"] == model.config.image_token_id).sum()),
                  "n_new": out.shape[1] - inputs["input_ids"].shape[1], "cls": type(processor).__name__}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, str(merged_dir), str(world["images"] / "img1.png")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["dpa"] == []
    assert res["cls"] == "LlavaProcessor"
    assert res["n_image"] == 16 and res["n_new"] == 4
    assert res["prompt"].startswith("<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>\n")
    assert res["prompt"].endswith("<|im_start|>assistant\n")


# --- 6. resume -----------------------------------------------------------------------------------------

class Crash(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("simulated crash after step 2")


class Steps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


RESUME = TrainSettings(learning_rate=1e-2, max_steps=4, global_batch_size=2, per_device_batch_size=2,
                       warmup_ratio=0.0, save_steps=1, save_total_limit=2)


def _resumable(kind: str, world, align_dir: Path):
    """(run(out, settings, callbacks), file with the trained weights, relative to the output)."""
    if kind == "align":
        return (lambda out, st, cbs: align(world["paths"], world["caps"], out, loss=LossConfig("cmo"), settings=st,
                                           callbacks=cbs), "connector.safetensors")
    if kind == "proxy":
        return (lambda out, st, cbs: proxy_pretrain(world["paths"].llm, world["text"], out, lora=LORA, settings=st,
                                                    callbacks=cbs), "adapter_model.safetensors")
    tune = kind.split("_")[1]
    return (lambda out, st, cbs: finetune(world["paths"], align_dir / "connector.safetensors", world["inst"], out,
                                          loss=LossConfig("cmo"), settings=st, tune=tune, lora=LORA, callbacks=cbs),
            "adapter/adapter_model.safetensors" if tune == "lora" else "model/model.safetensors")


@pytest.mark.parametrize("kind", ["align", "proxy", "finetune_lora", "finetune_full"])
def test_interrupted_run_resumes_from_its_last_checkpoint(kind, world, align_run, tmp_path):
    run, weights = _resumable(kind, world, align_run[0].out_dir)
    out = tmp_path / "stage"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(out, RESUME, [Crash()])
    assert not out.exists()  # no half-written output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stage")]  # nor a temporary sibling
    work = tmp_path / "stage.work"
    assert (work / "checkpoint-2").is_dir() and (work / "run_fingerprint.json").is_file()
    assert (work / "checkpoint-2" / COMPLETE_MARKER).is_file()

    steps = Steps()
    res = run(out, RESUME, [steps])
    assert steps.steps == [3, 4]  # continued after step 2 instead of starting over
    # The history survives the resume (it travels in the checkpoint), so it covers every step.
    assert [r["step"] for r in res.history if "loss" in r] == [1, 2, 3, 4]
    assert (out / weights).is_file() and not work.exists()

    # The weights are those of a run that was never interrupted (so the checkpoint's weights, not
    # only its step counter, optimizer and schedule, were restored).
    whole = run(tmp_path / "whole", RESUME, [])
    a, b = load_file(str(out / weights)), load_file(str(whole.out_dir / weights))
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    # ... and so are the history and the mean training loss (not the resumed steps' only).
    assert [r["loss"] for r in res.history if "loss" in r] == pytest.approx(
        [r["loss"] for r in whole.history if "loss" in r], rel=1e-5)
    assert res.metrics["train/train_loss"] == pytest.approx(whole.metrics["train/train_loss"], rel=1e-5)
    # byte for byte, so DVC sees the same output whether or not the run was interrupted
    for name in ("history.json", "metrics.json"):
        assert (out / name).read_bytes() == (whole.out_dir / name).read_bytes(), name


class CrashAtEnd(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        raise RuntimeError("simulated kill after the last checkpoint")


def test_kill_after_the_last_checkpoint_runs_no_extra_step(world, tmp_path):
    """Killed while writing the output, after the final checkpoint: the Trainer resumed from it and
    trained one step past max_steps (invisible with cosine, whose last lr is 0; here the lr is
    constant)."""
    constant = TrainSettings(**{**RESUME.__dict__, "lr_scheduler": "constant"})
    run, weights = _resumable("align", world, None)
    out = tmp_path / "stage"
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(out, constant, [CrashAtEnd()])
    assert (tmp_path / "stage.work" / "checkpoint-4" / COMPLETE_MARKER).is_file()
    steps = Steps()
    res = run(out, constant, [steps])
    assert steps.steps == []
    whole = run(tmp_path / "whole", constant, [])
    a, b = load_file(str(out / weights)), load_file(str(whole.out_dir / weights))
    for k in b:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in res.history] == [r["step"] for r in whole.history]
    for name in ("history.json", "metrics.json"):
        assert (out / name).read_bytes() == (whole.out_dir / name).read_bytes(), name


def test_changed_configuration_does_not_resume(world, tmp_path):
    out = tmp_path / "align"
    with pytest.raises(RuntimeError):
        align(world["paths"], world["caps"], out, loss=LossConfig("cmo"), settings=RESUME, callbacks=[Crash()])
    assert (tmp_path / "align.work" / "checkpoint-2").is_dir()
    steps = Steps()
    changed = TrainSettings(**{**RESUME.__dict__, "learning_rate": 5e-3})
    align(world["paths"], world["caps"], out, loss=LossConfig("cmo"), settings=changed, callbacks=[steps])
    assert steps.steps == [1, 2, 3, 4]  # started over: the stale checkpoints were not used


def _checkpoint(work: Path, step: int, complete: bool = True) -> Path:
    d = work / f"checkpoint-{step}"
    d.mkdir()
    (d / "trainer_state.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 100)
    if complete:
        mark_complete(d, step)
    return d


def test_prepare_work_dir(tmp_path, capsys):
    work = tmp_path / "w"
    assert prepare_work_dir(work, {"a": 1}) is None
    _checkpoint(work, 3)
    assert prepare_work_dir(work, {"a": 1}) == str(work / "checkpoint-3")
    assert prepare_work_dir(work, {"a": 2}) is None  # another configuration: wiped, with one line saying why
    assert not (work / "checkpoint-3").exists()
    assert "discarding the checkpoints" in capsys.readouterr().out
    _checkpoint(work, 5)
    (work / "run_fingerprint.json").unlink()  # checkpoints of unknown origin are not trusted either
    assert prepare_work_dir(work, {"a": 2}) is None and not (work / "checkpoint-5").exists()
    out = capsys.readouterr().out
    assert "no readable fingerprint" in out and len(out.strip().splitlines()) == 1


def test_changed_input_content_is_named(tmp_path, capsys):
    work = tmp_path / "w"
    fp = {"settings": {"lr": 1}, "inputs": {"proxy_adapter": "aaa", "llm": "bbb"}}
    prepare_work_dir(work, fp)
    _checkpoint(work, 2)
    assert prepare_work_dir(work, {**fp, "inputs": {"proxy_adapter": "ccc", "llm": "bbb"}}) is None
    line = capsys.readouterr().out.strip()
    assert "changed: inputs.proxy_adapter)" in line and "\n" not in line


def test_incomplete_checkpoints_are_skipped(tmp_path, capsys):
    work = tmp_path / "w"
    prepare_work_dir(work, {"a": 1})
    _checkpoint(work, 2)
    _checkpoint(work, 4, complete=False)  # killed while saving: no marker
    (_checkpoint(work, 3) / "model.safetensors").write_bytes(b"")  # marker, but the file is truncated
    assert prepare_work_dir(work, {"a": 1}) == str(work / "checkpoint-2")
    out = capsys.readouterr().out
    assert "checkpoint-4: no completion marker" in out
    assert "checkpoint-3: model.safetensors has 0 bytes, 100 were written" in out
    assert not (work / "checkpoint-4").exists() and not (work / "checkpoint-3").exists()


def test_kill_during_a_checkpoint_save_falls_back_to_the_previous_one(world, tmp_path):
    """A checkpoint whose weights file was cut short (a kill while saving) is skipped: the run
    resumes from the one before and still ends with the weights of an uninterrupted run."""
    run, weights = _resumable("align", world, None)
    out = tmp_path / "stage"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(out, RESUME, [Crash()])
    work = tmp_path / "stage.work"
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    (work / "checkpoint-2" / "model.safetensors").write_bytes(b"")  # what the kill left
    steps = Steps()
    res = run(out, RESUME, [steps])
    assert steps.steps == [2, 3, 4]
    assert [r["step"] for r in res.history if "loss" in r] == [1, 2, 3, 4]
    whole = run(tmp_path / "whole", RESUME, [])
    a, b = load_file(str(out / weights)), load_file(str(whole.out_dir / weights))
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_changed_input_content_does_not_resume(world, tmp_path, capsys):
    """Same paths, other bytes (the proxy retrained, the data regenerated): the checkpoints go."""
    caps = tmp_path / "caps.json"
    caps.write_text((world["dir"] / "caps.json").read_text())
    src = [DataSource(caps, world["images"])]
    out = tmp_path / "align"
    with pytest.raises(RuntimeError):
        align(world["paths"], src, out, loss=LossConfig("cmo"), settings=RESUME, callbacks=[Crash()])
    recs = json.loads(caps.read_text())
    recs[0]["conversations"][1]["value"] = "a brown hexagon at the top"
    caps.write_text(json.dumps(recs))
    capsys.readouterr()
    steps = Steps()
    align(world["paths"], src, out, loss=LossConfig("cmo"), settings=RESUME, callbacks=[steps])
    assert steps.steps == [1, 2, 3, 4]
    assert "changed: inputs.captions.files)" in capsys.readouterr().out


# --- 7. validation happens before training starts ------------------------------------------------------

class NeverTrain(TrainerCallback):
    def on_train_begin(self, *args, **kwargs):
        raise AssertionError("training started despite bad input")


def _assert_nothing_written(out: Path):
    assert not out.exists() and not out.with_name(out.name + ".work").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)]


def test_bad_record_fails_before_training(world, tmp_path):
    recs = json.loads((world["dir"] / "caps.json").read_text())
    recs.append({**recs[0], "id": "late-bad", "image": "missing.png"})  # the very last record is broken
    bad = tmp_path / "caps.json"
    bad.write_text(json.dumps(recs))
    out = tmp_path / "align"
    with pytest.raises(DPAInputError) as e:
        align(world["paths"], [DataSource(bad, world["images"])], out, loss=LossConfig("cmo"), settings=SETTINGS,
              callbacks=[NeverTrain()])
    assert str(bad) in str(e.value) and "record 'late-bad'" in str(e.value) and "Fix:" in str(e.value)
    _assert_nothing_written(out)


def test_bad_models_fail_before_training(world, tmp_path, align_run):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100).save_pretrained(gpt2)
    out = tmp_path / "out"
    with pytest.raises(DPAInputError, match="gpt2") as e:
        align(ModelPaths(world["paths"].vision, gpt2), world["caps"], out, loss=LossConfig("cmo"), settings=SETTINGS,
              callbacks=[NeverTrain()])
    assert str(gpt2 / "config.json") in str(e.value)
    _assert_nothing_written(out)

    with pytest.raises(DPAInputError, match="image token") as e:
        align(ModelPaths(world["paths"].vision, world["paths"].llm, add_image_token=False), world["caps"], out,
              loss=LossConfig("cmo"), settings=SETTINGS, callbacks=[NeverTrain()])
    assert "tokenizer_config.json" in str(e.value)
    _assert_nothing_written(out)

    wide = make_llm(tmp_path / "wide", hidden=48)
    connector = align_run[0].out_dir / "connector.safetensors"
    with pytest.raises(DPAInputError, match="connector") as e:
        finetune(ModelPaths(world["paths"].vision, wide), connector, world["inst"], out, loss=LossConfig("cmo"),
                 settings=SETTINGS, callbacks=[NeverTrain()])
    assert str(connector) in str(e.value) and "Fix:" in str(e.value)
    _assert_nothing_written(out)

    with pytest.raises(DPAInputError, match="no finetune output"):
        merge(world["paths"], tmp_path, tmp_path / "merged")


def test_global_batch_must_divide(world, tmp_path):
    bad = TrainSettings(**{**SETTINGS.__dict__, "global_batch_size": 3})
    out = tmp_path / "align"
    with pytest.raises(DPAInputError, match="global_batch_size"):
        align(world["paths"], world["caps"], out, loss=LossConfig("cmo"), settings=bad, callbacks=[NeverTrain()])
    assert not out.exists()


def test_untrained_connector_is_where_alignment_starts(align_run, world, tmp_path):
    """The no-alignment control finetunes from the connector an aligned arm starts from."""
    _, snap = align_run
    res = untrained_connector(world["paths"], tmp_path / "u", seed=SETTINGS.seed)
    saved = load_file(str(res.out_dir / "connector.safetensors"))
    start = {n.split("multi_modal_projector.")[1]: t for n, t in snap.before.items() if _is_projector(n)}
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    assert not all(torch.equal(saved[k], snap.after["model.multi_modal_projector." + k]) for k in saved)
    assert json.loads((res.out_dir / "metrics.json").read_text()) == {"trained": 0}


def test_same_configuration_gives_the_same_connector(world, tmp_path):
    """The seed applies to the freshly initialised connector too, so a run is reproducible."""
    one = TrainSettings(**{**SETTINGS.__dict__, "max_steps": 1})
    outs = [align(world["paths"], world["caps"], tmp_path / f"a{k}", loss=LossConfig("vanilla"), settings=one).out_dir
            for k in range(2)]
    a, b = (load_file(str(o / "connector.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = align(world["paths"], world["caps"], tmp_path / "seed1", loss=LossConfig("vanilla"),
                  settings=TrainSettings(**{**one.__dict__, "seed": 1})).out_dir
    c = load_file(str(other / "connector.safetensors"))
    assert not torch.equal(a["linear_1.weight"], c["linear_1.weight"])
