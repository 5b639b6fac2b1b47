"""Issue 15, items 2 and 4-5: every input checked before work, OS errors as one line, outputs that
are deterministic, leave nothing behind and get normal permissions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

from dpa_core.errors import DPAInputError
from dpa_core.io import atomic_dir, write_json_atomic
from dpa_core.losses import LossConfig
from dpa_core.preflight import preflight
from dpa_core.stages import DataSource, LoraSettings, ModelPaths, align, finetune, proxy_pretrain
from dpa_core.trainer import TrainSettings
from pipelines.params import load_params

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = TrainSettings(learning_rate=1e-2, max_steps=1, global_batch_size=2, per_device_batch_size=2,
                         warmup_ratio=0.0, save_steps=0)
VISION_PAD = "<|vision_pad|>"


class NeverTrain(TrainerCallback):
    def on_train_begin(self, *args, **kwargs):
        raise AssertionError("training started despite bad input")


@pytest.fixture(scope="module")
def data(tiny_paths, tmp_path_factory):
    d = tmp_path_factory.mktemp("preflight")
    names = sorted(p.name for p in tiny_paths["images"].glob("*.png"))
    caps = [{"id": f"c{i}", "image": n, "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle"}]}
        for i, n in enumerate(names)]
    inst = [{"id": f"q{i}", "image": n, "conversations": [
        {"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "it is red."}]}
        for i, n in enumerate(names)]
    (d / "caps.json").write_text(json.dumps(caps))
    (d / "inst.json").write_text(json.dumps(inst))
    (d / "text.jsonl").write_text("\n".join(json.dumps({"id": c["id"], "text": "a red circle"}) for c in caps))
    # An LLM whose tokenizer already has an unused special token for images (as Qwen's <|vision_pad|>).
    llm = d / "llm-vision-pad"
    shutil.copytree(tiny_paths["llm"], llm)
    tok = AutoTokenizer.from_pretrained(llm)
    tok.add_special_tokens({"extra_special_tokens": [VISION_PAD]}, replace_extra_special_tokens=False)
    tok.save_pretrained(llm)
    return {"dir": d, "images": tiny_paths["images"], "clip": tiny_paths["clip"], "llm": tiny_paths["llm"],
            "llm_pad": llm, "caps": [DataSource(d / "caps.json", tiny_paths["images"])],
            "inst": [DataSource(d / "inst.json", tiny_paths["images"])]}


def _edit_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _nothing_written(out: Path) -> None:
    assert not out.exists() and not out.with_name(out.name + ".work").exists()


# --- item 2: model compatibility before work -------------------------------------------------------

def test_existing_special_token_as_image_token_trains_through_finetune(data, tmp_path):
    """The fix the missing-token error suggests (name an existing special token): the data code
    must use the configured token, not a hard-coded "<image>" (finetune crashed at step 0)."""
    paths = ModelPaths(data["clip"], data["llm_pad"], image_token=VISION_PAD, add_image_token=False)
    assert preflight(paths.vision, paths.llm, VISION_PAD, False).num_image_tokens == 16
    a = align(paths, data["caps"], tmp_path / "align", loss=LossConfig("vanilla"), settings=ONE_STEP)
    f = finetune(paths, a.out_dir / "connector.safetensors", data["inst"], tmp_path / "ft", loss=LossConfig("cmo"),
                 settings=ONE_STEP, lora=LoraSettings(4, 8, 0.0))
    assert (f.out_dir / "adapter" / "adapter_model.safetensors").is_file()
    # Records may also spell the placeholder as the configured token itself.
    recs = json.loads((data["dir"] / "inst.json").read_text())
    for r in recs:
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", VISION_PAD)
    (tmp_path / "inst2.json").write_text(json.dumps(recs))
    finetune(paths, a.out_dir / "connector.safetensors", [DataSource(tmp_path / "inst2.json", data["images"])],
             tmp_path / "ft2", loss=LossConfig("vanilla"), settings=ONE_STEP, lora=LoraSettings(4, 8, 0.0))


def test_image_token_used_by_the_chat_template_is_refused(data, tmp_path):
    paths = ModelPaths(data["clip"], data["llm"], image_token="<|im_start|>", add_image_token=False)
    with pytest.raises(DPAInputError, match="already used by the tokenizer") as e:
        align(paths, data["caps"], tmp_path / "a", loss=LossConfig("cmo"), settings=ONE_STEP, callbacks=[NeverTrain()])
    assert "tokenizer_config.json" in str(e.value) and "Fix:" in str(e.value)
    _nothing_written(tmp_path / "a")


def test_vision_config_that_does_not_match_its_weights(data, tmp_path):
    bad = _edit_config(data["clip"], tmp_path / "clip", lambda c: c["vision_config"].update(hidden_size=32))
    with pytest.raises(DPAInputError, match=r"has shape \[.*\] but config.json asks for") as e:
        align(ModelPaths(bad, data["llm"]), data["caps"], tmp_path / "a", loss=LossConfig("cmo"), settings=ONE_STEP,
              callbacks=[NeverTrain()])
    assert str(bad / "config.json") in str(e.value)
    _nothing_written(tmp_path / "a")


def test_llm_without_positions_for_the_image_tokens(data, tmp_path):
    short = _edit_config(data["llm"], tmp_path / "llm", lambda c: c.update(max_position_embeddings=20))
    with pytest.raises(DPAInputError, match="16 image tokens but the LLM has only 20 positions") as e:
        align(ModelPaths(data["clip"], short), data["caps"], tmp_path / "a", loss=LossConfig("cmo"),
              settings=ONE_STEP, callbacks=[NeverTrain()])
    assert str(short / "config.json") in str(e.value)
    with pytest.raises(DPAInputError, match="max_length = 20 leaves no room for text"):
        align(ModelPaths(data["clip"], data["llm"]), data["caps"], tmp_path / "a", loss=LossConfig("cmo"),
              settings=ONE_STEP, max_length=20, callbacks=[NeverTrain()])
    _nothing_written(tmp_path / "a")


def _params(data, tmp_path, **over):
    base = {"model.vision": str(data["clip"]), "model.llm": str(data["llm"]), "runtime.outputs": str(tmp_path / "outputs"), "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return load_params(ROOT / "params.yaml", {**base, **over})


def test_proxy_stage_checks_the_model_pair_first(data, tmp_path):
    """An LLM that cannot hold the image tokens is reported by the first training stage (proxy) and
    by `dpa validate`, not after the proxy retrained."""
    from pipelines.cli import main as dpa_main
    from pipelines.entrypoints import proxy

    short = _edit_config(data["llm"], tmp_path / "llm", lambda c: c.update(max_position_embeddings=20))
    p = _params(data, tmp_path, **{"model.llm": str(short)})
    with pytest.raises(DPAInputError, match="positions"):
        proxy(p, 0)  # before it even looks for the mix
    assert not (tmp_path / "outputs").exists()
    assert dpa_main(["validate", "--params", str(ROOT / "params.yaml"), "-S", f"model.llm={short}",
                     "-S", f"model.vision={data['clip']}"]) == 2


# --- item 2: all data sources in the mix stage ---------------------------------------------------

def _world(data, tmp_path, bad_instruction: bool):
    root = tmp_path / "data"
    shutil.copytree(data["images"], root / "images")
    caps = json.loads((data["dir"] / "caps.json").read_text())
    for style in ("terse", "verbose"):  # 24 records per source: enough to hold some out
        recs = [{**c, "id": f"{c['id']}-{k}", "conversations": [
            c["conversations"][0], {"from": "gpt", "value": f"{style} shape {k}"}]} for k in range(4) for c in caps]
        (root / f"{style}.json").write_text(json.dumps(recs))
    inst = json.loads((data["dir"] / "inst.json").read_text())
    if bad_instruction:
        inst.append({**inst[0], "id": "late-bad", "image": "missing.png"})
    (root / "inst.json").write_text(json.dumps(inst))
    src = lambda n: {"name": n, "path": str(root / f"{n}.json"), "image_root": str(root / "images")}  # noqa: E731
    return {"data.root": str(root), "data.captions": [src("terse"), src("verbose")], "reliance.captions": [],
            "evaluate.benchmarks": [],  # the shipped ones lie under the toy data.root
            "reliance.content_words": None,
            "data.instructions": [{"name": "inst", "path": str(root / "inst.json"), "image_root": str(root / "images")}]}


def test_mix_checks_the_instruction_sources_too(data, tmp_path):
    from pipelines.entrypoints import mix

    p = _params(data, tmp_path, **_world(data, tmp_path, bad_instruction=True))
    with pytest.raises(DPAInputError) as e:
        mix(p)
    msg = str(e.value)
    assert "inst.json" in msg and "record 'late-bad'" in msg and "missing.png" in msg and "Fix:" in msg
    assert not (tmp_path / "outputs" / "mix").exists()


def test_mix_total_that_empties_the_holdout_is_refused(data, tmp_path):
    from pipelines.entrypoints import mix

    p = _params(data, tmp_path, **_world(data, tmp_path, bad_instruction=False), **{"mix.total": 12})
    with pytest.raises(DPAInputError, match="too few to hold any out"):
        mix(p)
    assert not (tmp_path / "outputs" / "mix").exists()


def test_diagnose_refuses_an_empty_holdout(data, tmp_path):
    """It wrote `{}` without a word (a mix from before the mix stage refused it)."""
    from pipelines.entrypoints import diagnose

    p = _params(data, tmp_path)
    mix = tmp_path / "outputs" / "mix"
    mix.mkdir(parents=True)
    (mix / "text_holdout.jsonl").write_text("")
    with pytest.raises(DPAInputError, match="held-out text is empty") as e:
        diagnose(p, 0)
    assert "text_holdout.jsonl" in str(e.value) and "mix.total" in str(e.value)
    assert not (tmp_path / "outputs" / "metrics").exists()


# --- OS errors ---------------------------------------------------------------------------------------

def test_disk_full_during_a_checkpoint_write_is_one_line(tiny_llava_dir, tmp_path):
    """A real full file system (a 16 KiB tmpfs in a private mount namespace), the real merge writer."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespaces here")
    small = tmp_path / "small"
    small.mkdir()
    code = ("import sys; from transformers import LlavaForConditionalGeneration, AutoProcessor\n"
            "from dpa_core.modeling import save_llava\nfrom dpa_core.errors import DPAStorageError\n"
            f"m = LlavaForConditionalGeneration.from_pretrained({str(tiny_llava_dir)!r})\n"
            f"p = AutoProcessor.from_pretrained({str(tiny_llava_dir)!r})\n"
            f"try:\n    save_llava(m, p, {str(small / 'merged' / 'dpa-seed0')!r})\n"
            "except DPAStorageError as e:\n    print('ERR', e); sys.exit(3)\n")
    script = f"mount -t tmpfs -o size=16k tmpfs {small} && {sys.executable} -c \"$CODE\"; rc=$?; " \
             f"find {small} -mindepth 1; exit $rc"
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CODE": code, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    err = next(line for line in lines if line.startswith("ERR"))
    assert "no space left on the device while writing" in err and "merged/dpa-seed0" in err and "Fix:" in err
    # nothing partial left behind: only the (empty) parent directory
    assert [line for line in lines if not line.startswith("ERR")] == [str(small / "merged")]


# --- item 4: leftovers and permissions --------------------------------------------------------------

def test_stale_temporaries_are_cleaned_and_outputs_get_normal_permissions(tmp_path):
    final = tmp_path / "merged" / "dpa-seed0"
    final.parent.mkdir()
    stale = final.parent / ".dpa-seed0.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (final.parent / ".dpa-seed0.old-999").mkdir()
    other = final.parent / ".vanilla-seed0.tmp-x"  # another output's temporary is not ours to remove
    other.mkdir()
    old = os.umask(0o022)
    try:
        with atomic_dir(final) as tmp:
            (tmp / "a.json").write_text("{}")
        write_json_atomic(tmp_path / "metrics" / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert sorted(p.name for p in final.parent.iterdir()) == [".vanilla-seed0.tmp-x", "dpa-seed0"]
    assert final.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "metrics" / "m.json").stat().st_mode & 0o777 == 0o644


# --- item 5: deterministic outputs ---------------------------------------------------------------------

def _hashes(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("kind", ["vanilla", "cmo"])
def test_a_stage_run_twice_writes_identical_bytes(data, tmp_path, kind):
    paths = ModelPaths(data["clip"], data["llm"])
    runs = [align(paths, data["caps"], tmp_path / f"align{k}", loss=LossConfig(kind), settings=ONE_STEP).out_dir
            for k in range(2)]
    assert _hashes(runs[0]) == _hashes(runs[1])
    assert not any("runtime" in k or "per_second" in k for k in json.loads((runs[0] / "metrics.json").read_text()))


def test_proxy_adapter_bytes_do_not_depend_on_the_hash_seed(data, tmp_path):
    """peft keeps target_modules in a set: its order followed PYTHONHASHSEED, so two runs of the same
    configuration wrote different adapter_config.json files (and DVC reran everything downstream)."""
    code = ("import sys; from pathlib import Path; from dpa_core.stages import proxy_pretrain, LoraSettings\n"
            "from dpa_core.trainer import TrainSettings\n"
            "st = TrainSettings(learning_rate=1e-2, max_steps=1, global_batch_size=2, per_device_batch_size=2, "
            "warmup_ratio=0.0, save_steps=0)\n"
            "proxy_pretrain(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), lora=LoraSettings(4, 8, 0.0), "
            "settings=st)\n")
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"proxy{seed}"
        subprocess.run([sys.executable, "-c", code, str(data["llm"]), str(data["dir"] / "text.jsonl"), str(out)],
                       check=True, capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)})
        outs.append(out)
    cfg = json.loads((outs[0] / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(cfg["target_modules"])
    assert _hashes(outs[0]) == _hashes(outs[1])


def test_world_built_twice_is_byte_identical_manifest_included(tmp_path):
    """The world manifest held wall-clock timings, so every rebuild changed the `world` output's
    hash and DVC reran the whole study downstream of identical data and models."""
    from dpa_core.toyworld import build_world

    fast = {"llm_steps": 2, "clip_steps": 2}
    built = [build_world(tmp_path / f"w{k}", "smoke", seed=0, overrides=fast) for k in range(2)]
    assert "timings_s" in built[0]  # still returned to the caller (MLflow, outputs/timings)
    a, b = _hashes(tmp_path / "w0"), _hashes(tmp_path / "w1")
    assert "manifest.json" in a and a == b
