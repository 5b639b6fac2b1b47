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


@pytest.fixture(scope="module")
def scored(world, tmp_path_factory):
    """The ceiling (base LLM, scene as text) and the reference (untrained connector) on a slice."""
    out, _ = world
    tmp = tmp_path_factory.mktemp("instrument-scores")
    tsv = out / "bench" / "toy_mcq.tsv"
    ceiling = evaluate_text_oracle(out / "models" / "llm", tsv, tmp / "ceiling", limit=QUESTIONS,
                                   batch_size=32, max_new_tokens=4, device="cpu")
    torch.manual_seed(0)
    model, processor = build_llava(out / "models" / "clip", out / "models" / "llm")
    save_llava(model, processor, tmp / "reference-model")
    reference = evaluate_tsv(tmp / "reference-model", tsv, tmp / "reference", limit=QUESTIONS,
                             batch_size=32, max_new_tokens=4, device="cpu")
    return ceiling, reference


def test_cloze_ceiling_far_above_the_reference(scored):
    """Scored without letters, the instrument has a window: with the shipped three-object models on
    the whole benchmark (2703 questions, the demo's evaluate_reference) ceiling 0.74, reference 0.28."""
    ceiling, reference = scored
    assert ceiling["toy_mcq/cloze/overall"] >= 0.40, ceiling
    assert ceiling["toy_mcq/cloze/count"] >= 0.9, ceiling
    assert reference["toy_mcq/cloze/overall"] <= CHANCE + 0.07, reference
    assert ceiling["toy_mcq/cloze/overall"] - reference["toy_mcq/cloze/overall"] >= 0.15


@pytest.mark.xfail(strict=False, reason="issue 11 is open: the shipped base LLM reads a scene told in words (cloze 74%) "
                   "but maps few answers to their option letter: letter-scored ceiling 36%, counts 74% and the "
                   "rest near chance (docs/toyworld.md)")
def test_letter_ceiling_far_above_chance_and_reference_near_it(scored):
    ceiling, reference = scored
    assert ceiling["toy_mcq/lik/overall"] >= 0.6, ceiling
    assert reference["toy_mcq/lik/overall"] <= CHANCE + 0.1, reference
    assert ceiling["toy_mcq/lik/overall"] - reference["toy_mcq/lik/overall"] >= 0.3
