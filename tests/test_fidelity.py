"""Issue 13: paper-scale fidelity to upstream (fnlp-vision/DPA). One test (or a few) per item;
item 2 (the CMO weight at the image boundary) and the dropout-free image-free pass (item 4) are in
tests/test_fidelity_boundary.py, the FSDP run (item 7) in tests/test_multiprocess.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, TrainerCallback

from dpa_core.data import Collator, Encoder, MultimodalDataset, load_llava_records
from dpa_core.errors import DPAInputError
from dpa_core.image_free import llava_of
from dpa_core.losses import IGNORE_INDEX, LossConfig
from dpa_core.sampling import ModalityLengthGroupedSampler, modality_length_grouped_indices
from dpa_core.stages import DataSource, LoraSettings, ModelPaths, align, finetune
from dpa_core.trainer import TrainSettings, gradient_accumulation
from pipelines.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["qwen2.5-7b", "llama3.1-8b", "gemma2-9b"]
SETTINGS = TrainSettings(learning_rate=1e-2, max_steps=1, global_batch_size=2, per_device_batch_size=2,
                         warmup_ratio=0.0, save_steps=0)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


class VisionInputs(TrainerCallback):
    """The pixel_values that reach the vision tower of the model being trained."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        llava_of(model).model.vision_tower.register_forward_pre_hook(lambda mod, a, kw: self.seen.append((a[0] if a else kw["pixel_values"]).detach().clone()),
                                        with_kwargs=True)


@pytest.fixture(scope="module")
def wide_world(tiny_paths, tmp_path_factory):
    """A 3:1 image: red left third, green middle, blue right third; caption and instruction records on it."""
    d = tmp_path_factory.mktemp("fidelity")
    images = d / "images"
    images.mkdir()
    im = Image.new("RGB", (48, 16), GREEN)
    im.paste(Image.new("RGB", (16, 16), RED), (0, 0))
    im.paste(Image.new("RGB", (16, 16), BLUE), (32, 0))
    im.save(images / "wide.png")
    caps = [{"id": f"c{i}", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red left, blue right"}]} for i in range(2)]
    (d / "caps.json").write_text(json.dumps(caps))
    return {"dir": d, "images": images, "paths": ModelPaths(tiny_paths["clip"], tiny_paths["llm"]),
            "caps": [DataSource(d / "caps.json", images)]}


def _normalised(processor, rgb) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, processor.image_mean, processor.image_std)])


def _has_colour(pixels: torch.Tensor, want: torch.Tensor, tol: float = 0.05) -> bool:
    """Some pixel of [3, H, W] has (about) the colour `want` [3]."""
    return bool(((pixels - want[:, None, None]).abs().amax(0) < tol).any())


# ---- item 1: image preprocessing ------------------------------------------------------------------

@pytest.mark.parametrize("ratio", ["pad", "crop"])
def test_image_aspect_ratio_reaches_the_model(wide_world, tiny_paths, ratio):
    seen = VisionInputs()
    align(wide_world["paths"], wide_world["caps"], wide_world["dir"] / f"align-{ratio}", loss=LossConfig("vanilla"),
          settings=SETTINGS, image_aspect_ratio=ratio, callbacks=[seen])
    assert seen.seen, "the vision tower never ran"
    pixels = seen.seen[0][0]
    proc = CLIPImageProcessor.from_pretrained(tiny_paths["clip"])
    red, green, blue = (_normalised(proc, c) for c in (RED, GREEN, BLUE))
    mean_fill = _normalised(proc, tuple(int(m * 255) for m in proc.image_mean))
    assert _has_colour(pixels, green)
    if ratio == "pad":  # the whole width, the sides included, plus bands of the mean colour above and below
        assert _has_colour(pixels, red) and _has_colour(pixels, blue)
        assert _has_colour(pixels[:, :2], mean_fill, tol=0.02) and _has_colour(pixels[:, -2:], mean_fill, tol=0.02)
    else:  # CLIP's centre crop: the middle third only
        assert not _has_colour(pixels, red) and not _has_colour(pixels, blue)


def test_unknown_aspect_ratio_is_an_input_error(wide_world, tiny_paths):
    recs = load_llava_records(wide_world["dir"] / "caps.json", wide_world["images"])
    with pytest.raises(DPAInputError, match="image_aspect_ratio"):
        MultimodalDataset(recs, lambda r: {}, CLIPImageProcessor.from_pretrained(tiny_paths["clip"]), "square")


# ---- item 5: templates ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_paths):
    from dpa_core.modeling import load_tokenizer

    return load_tokenizer(tiny_paths["llm"])


def test_plain_and_text_end_with_newline_as_upstream(tok, wide_world):
    rec = load_llava_records(wide_world["dir"] / "caps.json", wide_world["images"])[0]
    nl = Encoder(tok, "<image>", 16, sequence_end="newline")
    eos = Encoder(tok, "<image>", 16)
    caption_nl = tok(rec.caption + "\n", add_special_tokens=False)["input_ids"]
    ex = nl.plain(rec)
    assert ex["input_ids"][16:].tolist() == caption_nl and tok.eos_token_id not in ex["input_ids"].tolist()
    assert ex["labels"][16:].tolist() == caption_nl and (ex["labels"][:16] == IGNORE_INDEX).all()
    assert eos.plain(rec)["input_ids"][-1].item() == tok.eos_token_id  # the default stays EOS
    text = Encoder(tok, sequence_end="newline").text("a red circle")
    assert text["input_ids"].tolist() == tok("a red circle\n", add_special_tokens=False)["input_ids"]
    with pytest.raises(DPAInputError, match="sequence_end"):
        Encoder(tok, sequence_end="eot")


def test_image_first_moves_the_image_to_the_start_of_its_turn(tok, wide_world, tmp_path):
    rec = {"id": "q", "image": "wide.png", "conversations": [
        {"from": "human", "value": "What is on the left? <image>"}, {"from": "gpt", "value": "red."}]}
    (tmp_path / "q.json").write_text(json.dumps([rec]))
    r = load_llava_records(tmp_path / "q.json", wide_world["images"])[0]
    moved = Encoder(tok, "<image>", 1, image_first=True).chat(r)["input_ids"].tolist()
    kept = Encoder(tok, "<image>", 1).chat(r)["input_ids"].tolist()
    image_id = tok.convert_tokens_to_ids("<image>")
    want = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat is on the left?"},
                                    {"role": "assistant", "content": "red."}], tokenize=False)
    assert moved == tok(want, add_special_tokens=False)["input_ids"]
    assert moved != kept and moved.index(image_id) < kept.index(image_id)


def test_system_prompt_precedes_every_conversation(tok, wide_world, tmp_path):
    rec = {"id": "q", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is left?"}, {"from": "gpt", "value": "red."}]}
    (tmp_path / "q.json").write_text(json.dumps([rec]))
    r = load_llava_records(tmp_path / "q.json", wide_world["images"])[0]
    ex = Encoder(tok, "<image>", 1, system_prompt="You are a helpful assistant.").chat(r)
    want = tok.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                    {"role": "user", "content": "<image>\nWhat is left?"},
                                    {"role": "assistant", "content": "red."}], tokenize=False)
    assert ex["input_ids"].tolist() == tok(want, add_special_tokens=False)["input_ids"]
    # the loss is still on the answer only: the same targets as without a system message
    plain = Encoder(tok, "<image>", 1).chat(r)
    targets = lambda e: [t for t in e["labels"].tolist() if t != IGNORE_INDEX]
    assert targets(ex) == targets(plain) and targets(ex)


# ---- item 6: text-only records in instruction data ------------------------------------------------

@pytest.fixture(scope="module")
def mixed_instructions(wide_world):
    d = wide_world["dir"]
    recs = [{"id": f"i{i}", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is left?"}, {"from": "gpt", "value": "red " * (i + 1)}]}
        for i in range(5)]
    recs += [{"id": f"t{i}", "conversations": [
        {"from": "human", "value": "say " + "blue " * (i + 1)}, {"from": "gpt", "value": "blue."}]} for i in range(3)]
    (d / "mixed.json").write_text(json.dumps(recs))
    return [DataSource(d / "mixed.json", wide_world["images"])]


@pytest.fixture(scope="module")
def connector(wide_world):
    res = align(wide_world["paths"], wide_world["caps"], wide_world["dir"] / "align-conn", loss=LossConfig("vanilla"),
                settings=SETTINGS)
    return res.out_dir / "connector.safetensors"


def test_text_only_batch_weight_is_upstreams(tiny_paths, tok, mixed_instructions):
    """A batch without an image: the image-free pass equals the main one, delta = 0, every weight is
    delta_min (upstream: its masked pass has nothing to mask), so CMO equals the plain mean CE."""
    from dpa_core.modeling import build_llava
    from dpa_core.objective import multimodal_loss

    torch.manual_seed(0)
    model, processor = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    recs = [r for r in load_llava_records(mixed_instructions[0].path, mixed_instructions[0].image_root,
                                          require_image=False) if r.image is None]
    ds = MultimodalDataset(recs, Encoder(processor.tokenizer, "<image>", 16).chat, processor.image_processor)
    batch = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    assert "pixel_values" not in batch
    with torch.no_grad():
        cmo, stats = multimodal_loss(model, batch, LossConfig("cmo", image_boundary="image_position"), return_stats=True)
        vanilla = multimodal_loss(model, batch, LossConfig("vanilla"))
    torch.testing.assert_close(cmo, vanilla, rtol=1e-5, atol=1e-6)
    assert stats["weight_mean"] == pytest.approx(0.05) and stats["weight_std"] == pytest.approx(0.0, abs=1e-7)


def test_finetune_accepts_text_only_records(wide_world, mixed_instructions, connector):
    """Mixed instruction data trains (LoRA, CMO); a text-only micro-batch still gives the connector a
    (zero) gradient, so DDP's all-reduce sees every trainable parameter."""
    seen = VisionInputs()
    settings = replace(SETTINGS, max_steps=2, global_batch_size=4, per_device_batch_size=4)
    res = finetune(wide_world["paths"], connector, mixed_instructions, wide_world["dir"] / "ft-mixed",
                   loss=LossConfig("cmo"), settings=settings, lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                   callbacks=[seen])
    assert res.metrics["n_records"] == 8
    # 2 steps x 4 records = all 8 records once: the 5 images reached the model, the 3 text-only records none
    assert sum(len(p) for p in seen.seen) == 5


def test_text_only_batch_keeps_the_connector_in_the_graph(tiny_paths, tok, mixed_instructions):
    from dpa_core.modeling import build_llava
    from dpa_core.objective import multimodal_loss

    model, processor = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    recs = [r for r in load_llava_records(mixed_instructions[0].path, mixed_instructions[0].image_root,
                                          require_image=False) if r.image is None]
    ds = MultimodalDataset(recs, Encoder(processor.tokenizer, "<image>", 16).chat, processor.image_processor)
    batch = Collator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    multimodal_loss(model, batch, LossConfig("cmo")).backward()
    grads = [p.grad for p in model.model.multi_modal_projector.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


# ---- item 3: batch layout and the modality-length-grouped sampler ---------------------------------

def test_paper_profiles_reproduce_upstream_batch_layout():
    for name in PAPER:
        p = load_params(ROOT / "params.yaml", {"profile": name})
        got = {}
        for stage in ("proxy", "align", "finetune"):
            t = getattr(p, stage).train
            s = TrainSettings(global_batch_size=t.global_batch_size, per_device_batch_size=t.per_device_batch_size)
            got[stage] = (t.per_device_batch_size, gradient_accumulation(s, processes=8))
        # scripts/pretrain.sh, pretrain_lvlm.sh, finetune_lvlm.sh: 16 / 32 / 8 per device, 256 global on 8 GPUs
        assert got == {"proxy": (16, 2), "align": (32, 1), "finetune": (8, 4)}, (name, got)
        assert p.finetune.train.group_by_modality_length and not p.align.train.group_by_modality_length


def test_modality_grouped_indices():
    g = torch.Generator().manual_seed(0)
    lengths = [5 + (i % 7) for i in range(37)] + [-(3 + i % 5) for i in range(21)]
    idx = modality_length_grouped_indices(lengths, batch_size=2, world_size=4, generator=g)
    assert sorted(idx) == list(range(len(lengths)))
    mega = [idx[i:i + 8] for i in range(0, len(idx), 8)]
    # every global batch but the mixed leftover one is of one modality
    for m in mega[:-2]:
        assert len({lengths[i] > 0 for i in m}) == 1, m
    # within a megabatch, each micro-batch of 2 holds records of similar length (longest first overall)
    image_megas = [m for m in mega[:-2] if lengths[m[0]] > 0]
    assert image_megas and all(max(abs(lengths[i]) for i in m) == max(abs(lengths[i]) for i in m[:4] + m[4:])
                               for m in image_megas)
    again = modality_length_grouped_indices(lengths, 2, 4, torch.Generator().manual_seed(0))
    assert again == idx
    assert modality_length_grouped_indices(lengths, 2, 4, torch.Generator().manual_seed(1)) != idx


class _Recording(MultimodalDataset):
    loaded: list[int]

    def __getitem__(self, i):
        self.loaded.append(i)
        return super().__getitem__(i)


def test_trainer_uses_the_grouped_sampler(wide_world, mixed_instructions, tiny_paths):
    """With group_by_modality_length the Trainer draws each optimizer step's records from one modality."""
    from dpa_core.modeling import build_llava
    from dpa_core.trainer import train

    torch.manual_seed(0)
    model, processor = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    recs = load_llava_records(mixed_instructions[0].path, mixed_instructions[0].image_root, require_image=False)
    ds = _Recording(recs, Encoder(processor.tokenizer, "<image>", 16).chat, processor.image_processor)
    ds.loaded = []
    settings = TrainSettings(learning_rate=1e-3, epochs=1, global_batch_size=4, per_device_batch_size=2,
                             warmup_ratio=0.0, save_steps=0, group_by_modality_length=True)
    train(model, ds, Collator(processor.tokenizer.pad_token_id), settings, wide_world["dir"] / "grouped.work",
          loss_config=LossConfig("vanilla"))
    steps = [ds.loaded[i:i + 4] for i in range(0, len(ds.loaded), 4)]
    assert sorted(ds.loaded) == list(range(8))
    # 5 image and 3 text records, megabatch 4: one all-image step, then the mixed leftover (1 image + 3 text)
    kinds = [{recs[i].image is not None for i in s} for s in steps]
    assert kinds[0] == {True} and kinds[-1] == {True, False}, (steps, kinds)
    assert ds.modality_lengths == [5 + i for i in range(5)] + [-(3 + i) for i in range(3)]  # words, sign = modality


def test_group_by_modality_length_on_the_proxy_stage_is_refused():
    with pytest.raises(ParamsError, match="proxy.train.group_by_modality_length"):
        load_params(ROOT / "params.yaml", {"proxy.train.group_by_modality_length": True})


# ---- item 4: the connector's own learning rate -----------------------------------------------------

class OptimizerGroups(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [(g.get("initial_lr", g["lr"]), [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]


@pytest.mark.parametrize("connector_lr", [None, 2e-3])
def test_connector_learning_rate_is_a_parameter_group(wide_world, mixed_instructions, connector, connector_lr):
    groups = OptimizerGroups()
    settings = replace(SETTINGS, connector_learning_rate=connector_lr)
    finetune(wide_world["paths"], connector, mixed_instructions, wide_world["dir"] / f"ft-lr{connector_lr}",
             loss=LossConfig("vanilla"), settings=settings, lora=LoraSettings(r=4, alpha=8, dropout=0.05),
             callbacks=[groups])
    by_lr: dict[float, set[bool]] = {}
    for lr, names in groups.groups:
        for n in names:
            by_lr.setdefault(lr, set()).add("multi_modal_projector" in n)
    if connector_lr is None:
        assert set(by_lr) == {1e-2}
    else:  # connector at its own rate, the LoRA adapters at the train rate
        assert by_lr == {2e-3: {True}, 1e-2: {False}}, by_lr


def test_connector_learning_rate_validation():
    with pytest.raises(ParamsError, match="finetune.connector_learning_rate"):
        load_params(ROOT / "params.yaml", {"finetune.connector_learning_rate": -1.0})
    p = load_params(ROOT / "params.yaml", {"finetune.connector_learning_rate": 2e-5})
    assert p.finetune.connector_learning_rate == 2e-5


# ---- the settings: toy keeps today's behaviour, paper profiles follow upstream ----------------------

def test_toy_defaults_keep_todays_behaviour():
    p = load_params(ROOT / "params.yaml")
    assert (p.loss.image_boundary, p.proxy.sequence_end, p.align.sequence_end) == ("last_text", "eos", "eos")
    assert (p.align.image_aspect_ratio, p.finetune.image_aspect_ratio, p.finetune.image_first) == ("crop", "crop", False)
    assert p.finetune.connector_learning_rate is None and p.finetune.system_prompt is None
    assert not any(getattr(p, s).train.group_by_modality_length for s in ("proxy", "align", "finetune"))


@pytest.mark.parametrize("name", PAPER)
def test_paper_profiles_follow_upstream(name):
    p = load_params(ROOT / "params.yaml", {"profile": name})
    assert p.loss.image_boundary == "image_position"
    assert (p.proxy.sequence_end, p.align.sequence_end) == ("newline", "newline")
    assert (p.align.image_aspect_ratio, p.finetune.image_aspect_ratio, p.finetune.image_first) == ("crop", "pad", True)
    assert p.finetune.tune == "full" and p.finetune.connector_learning_rate is None
    assert p.finetune.system_prompt == {"qwen2.5-7b": "You are a helpful assistant.", "gemma2-9b": None}.get(
        name, "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language.")
    assert (p.proxy.max_length, p.align.max_length, p.finetune.max_length) == (8192, 8192, 2048)
    assert p.mix.dedup is False


# ---- item 7: DeepSpeed gradient accumulation --------------------------------------------------------

@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_configs_leave_accumulation_to_the_trainer(name):
    """`auto`: accelerate passes it on and the HF Trainer fills in its own (derived) accumulation;
    a number would have to equal it for every stage and process count (it was 1, the profiles need 2/1/4)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    raw = yaml.safe_load((ROOT / "configs" / "accelerate" / name).read_text())
    assert raw["deepspeed_config"]["gradient_accumulation_steps"] == "auto"
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "configs" / "accelerate" / name), "x.py"]))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "auto"


def test_deepspeed_is_an_optional_extra():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("deepspeed") for d in project["dependencies"])
    assert any(d.startswith("deepspeed") for d in project["optional-dependencies"]["deepspeed"])
    assert "deepspeed==" in (ROOT / "constraints.txt").read_text()
    assert "['optional-dependencies']['deepspeed']" in (ROOT / "docker" / "Dockerfile.gpu").read_text()


def test_fsdp_transformer_auto_wrap_finds_every_class(tiny_paths):
    """configs/accelerate/fsdp.yaml wraps the classes of the model's `_no_split_modules`; accelerate
    refuses a name the model lacks, and CLIPVisionModel inherits CLIPTextEmbeddings from CLIP's list."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from dpa_core.modeling import build_llava

    model, _ = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    assert set(model._no_split_modules) == {"Qwen2DecoderLayer", "CLIPEncoderLayer", "CLIPVisionEmbeddings"}
    # sync_module_states off: with it, the plugin asks for a GPU-type device at construction
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, auto_wrap_policy="transformer_based_wrap",
                                            sync_module_states=False, cpu_ram_efficient_loading=False)
    plugin.set_auto_wrap_policy(model)  # raised "Could not find the transformer layer class CLIPTextEmbeddings"
    assert plugin.auto_wrap_policy is not None
