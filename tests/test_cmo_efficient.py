"""The efficient CMO/CAL path gives the reference's token weights, loss and gradients.

Reference formulation: full logits of the main pass, an image-free pass over the full sequence
with image tokens masked out of attention, and `losses.contrastive_loss` (full softmax). The
efficient path (`LossConfig(image_free="efficient")`, the default) runs the image-free pass over
the text tokens only and scores only the positions whose weight can reach the loss, in chunks.
Everything in float32 on tiny random models; tolerance 1e-5.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dpa_core.chunked_ce import label_ce
from dpa_core.image_free import position_ids_for, reference_logits
from dpa_core.losses import (
    IGNORE_INDEX,
    LossConfig,
    contrastive_loss,
    label_logit_and_logprob,
    raw_token_scores,
    rows_that_matter,
    shift_labels,
    stand_in,
    stream_cells,
    token_weights,
    vanilla_loss,
)
from dpa_core.objective import efficient_deltas, main_pass, multimodal_loss
from tests.tiny_models import make_llm

TOL = 1e-5
N_IMG = 16  # tiny CLIP: 16x16 image, patch 4


@pytest.fixture(scope="module")
def models(tiny_paths, tmp_path_factory):
    """Tiny Llavas: Qwen2 (tied LM head) and Llama (separate LM head), logits sharpened so that the
    image visibly changes label probabilities (random tiny models are otherwise near-uniform)."""
    from dpa_core.modeling import build_llava

    llama = make_llm(tmp_path_factory.mktemp("llama"), family="llama", seed=1)
    out = {}
    for name, llm in (("qwen2", tiny_paths["llm"]), ("llama", llama)):
        torch.manual_seed(0)
        model, _ = build_llava(tiny_paths["clip"], llm)
        with torch.no_grad():
            model.model.language_model.norm.weight.mul_(8.0)
            for p in model.model.multi_modal_projector.parameters():
                p.mul_(4.0)
        out[name] = model.eval()
    return out


@torch.no_grad()
def greedy_tokens(model, prefix: torch.Tensor, pixel_values: torch.Tensor, n: int) -> torch.Tensor:
    """The model's own greedy continuation: labels the image makes likely, so CMO's deltas spread out
    (random labels have near-zero probability with and without the image)."""
    ids = prefix[None]
    for _ in range(n):
        logits = model(input_ids=ids, pixel_values=pixel_values[None], use_cache=False).logits[0, -1]
        logits[model.config.image_token_id] = -torch.inf
        ids = torch.cat([ids, logits.argmax()[None, None]], dim=1)
    return ids[0, len(prefix):]


def make_batch(model, layout: str, padding: str, seed: int = 0, no_target_rows=()) -> dict:
    """The sequences of `_sequences` padded on one side; rows in `no_target_rows` get every label -100."""
    seqs, pixel_values = _sequences(model, layout, seed)
    seqs = [(ids, torch.full_like(lab, IGNORE_INDEX) if b in no_target_rows else lab) for b, (ids, lab) in enumerate(seqs)]
    width = max(len(i) for i, _ in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros_like(input_ids)
    for b, (ids, lab) in enumerate(seqs):
        sl = slice(0, len(ids)) if padding == "right" else slice(width - len(ids), width)
        input_ids[b, sl], labels[b, sl], mask[b, sl] = ids, lab, 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}


@functools.cache
def _sequences(model, layout: str, seed: int):
    """Three sequences of different lengths, each with its own image.

    layout "alignment": image first, then a caption (all targets). "instruction": a short prompt,
    the image, more prompt, then an answer (targets) and a second prompt/answer turn. Targets are
    greedy continuations, prompts random tokens. Cached: the padding side does not change them.
    """
    g = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(3, 3, size, size, generator=g)
    image = torch.full((N_IMG,), image_id)
    seqs = []
    for b, n_text in enumerate((9, 6, 12)):
        rand = torch.randint(4, image_id, (n_text,), generator=g)
        if layout == "alignment":
            ids = torch.cat([image, greedy_tokens(model, image, pixel_values[b], n_text)])
            is_target = torch.arange(len(ids)) >= N_IMG
        else:
            ids = torch.cat([rand[:2], image, rand[2:4]])
            ids = torch.cat([ids, greedy_tokens(model, ids, pixel_values[b], 2), rand[4:6]])
            ids = torch.cat([ids, greedy_tokens(model, ids, pixel_values[b], n_text - 6)])
            is_target = torch.zeros(len(ids), dtype=torch.bool)
            is_target[N_IMG + 4 : N_IMG + 6] = True
            is_target[N_IMG + 8 :] = True
        seqs.append((ids, torch.where(is_target, ids, torch.full_like(ids, IGNORE_INDEX))))
    return seqs, pixel_values


def reference_deltas_and_loss(model, batch, cfg):
    """The reference formulation, written out: full logits, mask-based image-free pass, full softmax."""
    pos = position_ids_for(batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], position_ids=pos, use_cache=False).logits
    ni, has_source = reference_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], pos)
    ni = torch.where(has_source[..., None], ni, logits.detach())
    loss, stats = contrastive_loss(logits, ni, batch["labels"], cfg, return_stats=True,
                                   attention_mask=batch["attention_mask"])
    scored = stand_in(shift_labels(batch["labels"]))
    lg, lp = label_logit_and_logprob(logits[:, :-1].detach(), scored)
    lg_ni, lp_ni = label_logit_and_logprob(ni[:, :-1], scored)
    return raw_token_scores(cfg.kind, lg, lp, lg_ni, lp_ni), loss, stats


def efficient_deltas_of(model, batch, cfg):
    pos = position_ids_for(batch["attention_mask"])
    labels = shift_labels(batch["labels"])
    target = labels != IGNORE_INDEX
    keep = stream_cells(batch["attention_mask"], target)
    need = rows_that_matter(target, cfg, keep)
    with torch.no_grad():
        main = main_pass(model, batch, pos, need, stand_in(labels), cfg.chunk_tokens)
        return efficient_deltas(model, batch, pos, main, need, cfg), target, need, keep


def grads(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))


def assert_grads_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        ga, gb = a[name], b[name]
        if ga is None or gb is None:
            assert (ga is None or not ga.any()) and (gb is None or not gb.any()), name
            continue
        torch.testing.assert_close(ga, gb, atol=TOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def train_only(model, llm: bool):
    for n, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in n or (llm and "vision_tower" not in n))


CASES = [(kind, smoothing, padding, layout)
         for kind in ("cmo", "cal") for smoothing in ("flat", "per_sequence")
         for padding in ("right", "left") for layout in ("alignment", "instruction")]


@pytest.mark.parametrize("kind,smoothing,padding,layout", CASES)
def test_weights_and_loss_match_reference(models, kind, smoothing, padding, layout):
    model = models["qwen2"]
    batch = make_batch(model, layout, padding, no_target_rows=(1,))
    # The tiny models' logit differences lie in about [0, 2]: CAL bounds inside that range, so both bite.
    bounds = {"cal_min": 0.1, "cal_max": 1.5} if kind == "cal" else {}
    cfg = LossConfig(kind, smoothing=smoothing, image_free="efficient", chunk_tokens=4, **bounds)
    ref_delta, ref_loss, ref_stats = reference_deltas_and_loss(model, batch, cfg)
    delta, target, need, keep = efficient_deltas_of(model, batch, cfg)

    torch.testing.assert_close(delta[need], ref_delta[need], atol=TOL, rtol=0)
    assert ref_delta[need].std() > 1e-3  # the image really moves the scores: not a trivial comparison
    w_ref, w = token_weights(ref_delta, target, cfg, keep), token_weights(delta, target, cfg, keep)
    torch.testing.assert_close(w[target], w_ref[target], atol=TOL, rtol=0)
    lo, hi = cfg.clamp
    assert ((w_ref[target] > lo + 1e-3) & (w_ref[target] < hi - 1e-3)).any()  # not all at a clamp bound

    loss, stats = multimodal_loss(model, batch, cfg, return_stats=True)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=TOL)
    assert stats.keys() == ref_stats.keys()
    for k in stats:
        assert stats[k] == pytest.approx(ref_stats[k], abs=TOL), k


@pytest.mark.parametrize("family,llm_trainable", [("qwen2", False), ("qwen2", True), ("llama", True)])
@pytest.mark.parametrize("kind", ["cmo", "cal"])
def test_gradients_match_reference(models, family, llm_trainable, kind):
    model = models[family]
    train_only(model, llm_trainable)
    try:
        batch = make_batch(model, "instruction", "left", seed=1, no_target_rows=(2,))
        ref = grads(model, multimodal_loss(model, batch, LossConfig(kind, image_free="reference")))
        eff = grads(model, multimodal_loss(model, batch, LossConfig(kind, image_free="efficient", chunk_tokens=3)))
        assert_grads_close(eff, ref)
        assert any(g is not None and g.abs().sum() > 0 for g in eff.values())
    finally:
        train_only(model, True)


@pytest.mark.parametrize("layout", ["alignment", "instruction"])
def test_vanilla_path_unchanged(models, layout):
    """The vanilla loss (logits only where there are targets, chunked CE) equals the plain mean CE of
    full logits, with the same gradients."""
    model = models["llama"]
    train_only(model, True)
    batch = make_batch(model, layout, "right", seed=2, no_target_rows=(0,))
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], position_ids=position_ids_for(batch["attention_mask"]),
                   use_cache=False).logits
    ref = vanilla_loss(logits, batch["labels"])
    got = multimodal_loss(model, batch, LossConfig("vanilla"))
    assert got.item() == pytest.approx(ref.item(), abs=TOL)
    assert_grads_close(grads(model, got), grads(model, ref))


@pytest.mark.parametrize("image_free", ["reference", "efficient"])
@pytest.mark.parametrize("kind", ["vanilla", "cmo", "cal"])
def test_batch_without_any_target(models, kind, image_free):
    model = models["qwen2"]
    train_only(model, False)
    try:
        batch = make_batch(model, "instruction", "right", no_target_rows=(0, 1, 2))
        loss = multimodal_loss(model, batch, LossConfig(kind, image_free=image_free))
        assert loss.item() == 0.0
        loss.backward()  # still part of the graph, as the trainer expects
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        train_only(model, True)


def test_chunk_size_does_not_change_the_loss(models):
    model = models["qwen2"]
    batch = make_batch(model, "instruction", "left")
    losses = [multimodal_loss(model, batch, LossConfig("cmo", chunk_tokens=c)).item() for c in (1, 5, 4096)]
    assert losses == pytest.approx([losses[0]] * 3, abs=1e-6)


def test_lm_head_sees_only_needed_rows_in_chunks(models):
    """The main pass runs the LM head on the needed positions only, the image-free pass in chunks."""
    model = models["qwen2"]
    batch = make_batch(model, "alignment", "right")
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        with torch.no_grad():
            multimodal_loss(model, batch, LossConfig("cmo", chunk_tokens=4))
    finally:
        hook.remove()
    b, s = batch["input_ids"].shape
    main, *image_free = seen
    assert main[0] == b and main[1] <= s - N_IMG + 2  # text positions and a smoothing neighbour at each end
    assert image_free and all(len(shape) == 2 and shape[0] <= 4 for shape in image_free)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_ce_matches_cross_entropy(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(10, 37, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 37, (10,), generator=g)
    upstream = torch.rand(10, generator=g) * (torch.arange(10) % 3 > 0)  # some rows do not matter
    ref = F.cross_entropy(logits.float(), labels, reduction="none")
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), logits)
    for chunk in (1, 3, 100):
        ce, logit = label_ce(logits, labels, chunk)
        torch.testing.assert_close(ce, ref.detach(), atol=TOL, rtol=0)
        torch.testing.assert_close(logit, logits.detach().gather(1, labels[:, None]).squeeze(1).float())
        (grad,) = torch.autograd.grad((ce * upstream).sum(), logits)
        torch.testing.assert_close(grad, ref_grad, atol=TOL, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "dpa_core.bench.cmo", "--preset", "smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    for key in ("preset", "device", "dtype", "torch", "machine", "methods", "rows", "steps", "warmup", "memory"):
        assert key in report, key
    assert report["preset"] == "smoke" and report["machine"]["cpu"]
    assert set(report["methods"]) == {"vanilla", "cmo_reference", "cmo_efficient"}
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        assert {"name", "shape", "model", "image_tokens", "text_tokens", "batch"} <= row["config"].keys()
        for method in report["methods"]:
            res = row["results"][method]
            assert res["step_s"] > 0 and res["cpu_s"] > 0 and res["peak_bytes"] > 0
            assert len(res["step_s_all"]) == report["steps"]
        assert set(row["ratios"]) == {"efficient/vanilla", "reference/vanilla"}
        assert set(row["ratios"]["efficient/vanilla"]) == {"time", "cpu_time", "peak", "step_peak"}
        # same weights, same loss: the efficient and reference passes agree in the benchmark too
        assert row["results"]["cmo_efficient"]["loss"] == pytest.approx(row["results"]["cmo_reference"]["loss"], abs=1e-4)
    assert "eff/van time" in proc.stdout
