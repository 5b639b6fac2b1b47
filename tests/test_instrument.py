"""The toy study as an instrument (issue: a study that cannot see is noise). The default world built
from the shipped base models, as the demo's world stage builds it, must be able to tell a model
that sees from one that does not:

- the ceiling (the base LLM told each scene as text) is far above chance,
- the reference (base models, untrained connector) is near chance,
- the diagnostics are there: the register conflict (perplexity gap) and CLIP's retrieval.

Fails when the instrument is blind, whatever the arms do. Slow: it writes the default world's data
(about a minute) and scores a slice of the benchmark twice."""

from __future__ import annotations

import json

import pytest
import torch

from dpa_core.evaluation.builtin_scorer import evaluate_text_oracle, evaluate_tsv
from dpa_core.modeling import build_llava, save_llava
from dpa_core.toyworld import build_world
from tests.e2e_helpers import REPO

pytestmark = pytest.mark.slow

SHIPPED = REPO / "assets" / "toyworld" / "default-seed0"
CHANCE = 0.25
QUESTIONS = 400  # a slice: +-5 points at 95% on an accuracy near 0.5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("instrument") / "world"
    manifest = build_world(out, "default", seed=0, base_models=SHIPPED)
    return out, manifest


def test_diagnostics_are_present(world):
    out, manifest = world
    checks, gap = manifest["checks"], manifest["prior_gap_ppl"]
    assert checks["text_bench_acc_base_llm"] >= 0.9  # the LLM knows its facts
    assert checks["clip"]["bench_retrieval_acc_in_32"] >= 0.5  # chance 1/32
    assert gap["verbose"] > 5 * gap["own_style"]  # the register conflict is there
    assert json.loads((out / "metrics/prior_gap.json").read_text())["ppl"] == gap


@pytest.mark.xfail(strict=False, reason="issue 11 is open: the shipped base LLM copies counts and positions out of a "
                   "scene described in text but does not bind a colour to a shape, and answers every letter "
                   "question with one letter, so the ceiling is near chance (docs/toyworld.md)")
def test_ceiling_far_above_chance_and_reference_near_it(world, tmp_path):
    out, manifest = world
    tsv = out / "bench" / "toy_mcq.tsv"
    ceiling = evaluate_text_oracle(out / "models" / "llm", tsv, tmp_path / "ceiling", limit=QUESTIONS,
                                   batch_size=32, max_new_tokens=4, device="cpu")
    torch.manual_seed(0)
    model, processor = build_llava(out / "models" / "clip", out / "models" / "llm")
    save_llava(model, processor, tmp_path / "reference-model")
    reference = evaluate_tsv(tmp_path / "reference-model", tsv, tmp_path / "reference", limit=QUESTIONS,
                             batch_size=32, max_new_tokens=4, device="cpu")
    assert ceiling["toy_mcq/lik/overall"] >= 0.6, ceiling
    assert reference["toy_mcq/lik/overall"] <= CHANCE + 0.1, reference
    assert ceiling["toy_mcq/lik/overall"] - reference["toy_mcq/lik/overall"] >= 0.3
