"""VLMEvalKit (real code, offline): it loads a local TSV benchmark, our adapter answers it, its own
exact-matching evaluation scores it, and the score equals the built-in scorer's on the same predictions.

Skipped where VLMEvalKit is not installed (see docs/evaluation.md for the install line).
"""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
from PIL import Image

from dpa_core.evaluation import BenchmarkSkipped, evaluate_tsv, evaluate_vlmeval, extract_option
from dpa_core.evaluation.tsv_benchmark import write_benchmark_tsv
from dpa_core.evaluation.vlmeval_import import vlmeval_available
from tests.test_evaluation_extraction import MCQ_CASES, OPTIONS

pytestmark = [
    pytest.mark.slow,  # `import vlmeval` alone takes ~10 s here
    pytest.mark.skipif(not vlmeval_available(), reason="VLMEvalKit (nvidia-vlmeval) is not installed"),
]

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
# Reply formats both extractors read the same way (docs/evaluation.md lists where they differ).
AGREEING_REPLIES = ["A", "(B)", "C.", "The answer is D", "green", "B. green", "I think it is A", "?? no idea",
                    "A or B", "The answer is (C).", "It is yellow!", ""]


def toy_rows(n: int = 12) -> list[dict]:
    names = list(COLORS)
    rows = []
    for i in range(n):
        color = names[i % 4]
        rows.append({"index": i, "image": Image.new("RGB", (16, 16), COLORS[color]),
                     "question": f"Picture {i}: what colour fills it?", "A": "red", "B": "green", "C": "blue",
                     "D": "yellow", "answer": "ABCD"[i % 4], "category": ["color", "tint", "hue"][i % 3]})
    return rows


@pytest.fixture(scope="module")
def lmu(tmp_path_factory):
    root = tmp_path_factory.mktemp("LMUData")
    write_benchmark_tsv(toy_rows(), root / "toy_mcq.tsv")
    return root


class ScriptedByQuestion:
    """A fake generator: the reply for a request is chosen by the picture number in its prompt,
    so the built-in path and the VLMEvalKit path get the same reply for the same question."""

    def __init__(self, replies: list[str]):
        self.replies, self.prompts = replies, []

    def generate(self, requests, **kwargs):
        self.prompts += [r.prompt for r in requests]
        return [self.replies[int(r.prompt.split(":")[0].split()[-1]) % len(self.replies)] for r in requests]

    __call__ = generate


IMPORT_CHECK = """
import logging, os, ssl, sys, torch
https_context, handlers = ssl._create_default_https_context, logging.getLogger().handlers[:]
environ, rng = dict(os.environ), torch.random.get_rng_state()
from dpa_core.evaluation.vlmeval_import import import_vlmeval
vlmeval = import_vlmeval()
assert hasattr(vlmeval, "build_dataset")
assert ssl._create_default_https_context is https_context, "TLS checks left off"
assert torch.is_grad_enabled(), "gradients left off"
assert logging.getLogger().handlers == handlers, "root logger changed"
assert dict(os.environ) == environ, "environment changed"
assert torch.equal(torch.random.get_rng_state(), rng), "torch RNG reseeded"
assert not any(m.split(".")[0] == "torchvision" and getattr(sys.modules[m], "__file__", None) is None
               for m in sys.modules), "torchvision placeholder left behind"
print("clean")
"""


def test_import_leaves_process_alone():
    """In a fresh process: `import vlmeval` turns off TLS checks and gradients process-wide, reseeds
    torch, changes the environment and configures the root logger; import_vlmeval() undoes all of it."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-2000:]


def test_extraction_agrees_with_vlmeval_exact_matching():
    from dpa_core.evaluation.vlmeval_import import import_vlmeval

    import_vlmeval()
    from vlmeval.utils.matching_util import can_infer

    def theirs(reply, options):
        got = can_infer(reply, dict(options))
        return None if got in (False, "Z") else got

    for reply in AGREEING_REPLIES:
        assert extract_option(reply, OPTIONS) == theirs(reply, OPTIONS), reply
    # Where VLMEvalKit's exact matching gives up or reads "A" as the option, ours reads the reply.
    differs = {r for r, _ in MCQ_CASES if extract_option(r, OPTIONS) != theirs(r, OPTIONS)}
    assert differs == {"b", "d)", "answer: c.", "red circle", "Red Circle.", "A red circle",
                       "the answer is a red circle"}


def test_vlmeval_scores_equal_builtin_on_same_predictions(lmu, tmp_path):
    ours_gen, theirs_gen = ScriptedByQuestion(AGREEING_REPLIES), ScriptedByQuestion(AGREEING_REPLIES)
    ours = evaluate_tsv(None, lmu / "toy_mcq.tsv", tmp_path / "ours", generator=ours_gen)
    theirs = evaluate_vlmeval(None, "toy_mcq", tmp_path / "theirs", lmu_data=lmu, generator=theirs_gen)

    assert sorted(ours_gen.prompts) == sorted(theirs_gen.prompts)  # the adapter asks exactly what we ask
    for key in ("toy_mcq/overall", "toy_mcq/color", "toy_mcq/tint", "toy_mcq/hue"):
        assert theirs[key] == pytest.approx(ours[key]), key
    assert 0 < ours["toy_mcq/overall"] < 1
    # VLMEvalKit's own per-question verdicts are kept beside our predictions.
    assert (tmp_path / "theirs" / "DPALlava_toy_mcq_exact_matching_result.xlsx").is_file()
    assert json.loads((tmp_path / "theirs" / "scores.json").read_text()) == theirs


def test_real_model_same_predictions_and_scores(tiny_llava_dir, lmu, tmp_path):
    ours = evaluate_tsv(tiny_llava_dir, lmu / "toy_mcq.tsv", tmp_path / "ours", batch_size=4, max_new_tokens=6,
                        device="cpu")
    theirs = evaluate_vlmeval(tiny_llava_dir, "toy_mcq", tmp_path / "theirs", lmu_data=lmu, batch_size=4,
                              max_new_tokens=6, device="cpu")
    read = lambda d: {json.loads(x)["index"]: json.loads(x)["prediction"]  # noqa: E731
                      for x in (d / "predictions.jsonl").read_text().splitlines()}
    assert read(tmp_path / "ours") == read(tmp_path / "theirs")
    assert theirs["toy_mcq/overall"] == pytest.approx(ours["toy_mcq/overall"])


def test_adapter_in_vlmeval_own_inference_loop(tiny_llava_dir, lmu, tmp_path):
    """VLMEvalKit's infer_data_job (one question at a time) drives the adapter like any of its models."""
    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job
    from vlmeval.smp import load

    from dpa_core.evaluation.vlmeval_adapter import MODEL_NAME, DPALlavaVLM
    from dpa_core.evaluation.vlmeval_runner import lmu_data_root

    with lmu_data_root(lmu):
        dataset = build_dataset("toy_mcq")
        dataset.data = dataset.data.iloc[:4]
        model = DPALlavaVLM(tiny_llava_dir, device="cpu", max_new_tokens=6)
        infer_data_job(model, work_dir=str(tmp_path), model_name=MODEL_NAME, dataset=dataset)
        preds = load(str(tmp_path / f"{MODEL_NAME}_toy_mcq.xlsx"))
    ours = evaluate_tsv(tiny_llava_dir, lmu / "toy_mcq.tsv", tmp_path / "ours", batch_size=1, max_new_tokens=6,
                        device="cpu", limit=4, generator=model.generator)
    lines = (tmp_path / "ours" / "predictions.jsonl").read_text().splitlines()
    ours_preds = [json.loads(x)["prediction"] for x in lines]
    clean = lambda p: "" if str(p) == "nan" else str(p)  # noqa: E731 - an empty reply reads back from xlsx as NaN
    assert [clean(p) for p in preds["prediction"]] == ours_preds
    assert ours["meta/toy_mcq/n"] == 4


def test_official_datasets_absent_offline_are_skipped(lmu, tmp_path):
    for name in ("MMBench_DEV_EN", "AI2D_TEST", "OCRBench", "DocVQA_VAL", "NaturalBenchDataset"):
        with pytest.raises(BenchmarkSkipped, match="TSV not found"):
            evaluate_vlmeval(None, name, tmp_path / name, lmu_data=lmu)
        assert not (tmp_path / name).exists()  # no score, no output


def test_official_name_with_local_file(lmu, tmp_path, monkeypatch):
    """An official dataset name whose TSV lies in LMUData is used as is; a file that differs from
    VLMEvalKit's MD5 would be re-downloaded by VLMEvalKit, so it is skipped instead."""
    from vlmeval.dataset.image_mcq import ImageMCQDataset

    root = tmp_path / "LMUData"
    root.mkdir()
    write_benchmark_tsv(toy_rows(8), root / "AI2D_TEST.tsv")
    with pytest.raises(BenchmarkSkipped, match="wants to download"):
        evaluate_vlmeval(None, "AI2D_TEST", tmp_path / "a", lmu_data=root, generator=ScriptedByQuestion(["A"]))
    monkeypatch.setitem(ImageMCQDataset.DATASET_MD5, "AI2D_TEST",
                        hashlib.md5((root / "AI2D_TEST.tsv").read_bytes()).hexdigest())
    metrics = evaluate_vlmeval(None, "AI2D_TEST", tmp_path / "b", name="ai2d", lmu_data=root,
                               generator=ScriptedByQuestion(["A"]))
    assert metrics["ai2d/overall"] == pytest.approx(2 / 8)  # answers cycle A..D; always replying A gets 2 of 8


def test_custom_open_questions_are_left_to_the_builtin_scorer(tmp_path):
    root = tmp_path / "LMUData"
    root.mkdir()
    write_benchmark_tsv([{"index": 0, "image": Image.new("RGB", (8, 8)), "question": "Colour?", "answer": "black"}],
                        root / "open_q.tsv")
    with pytest.raises(BenchmarkSkipped, match="builtin_tsv"):
        evaluate_vlmeval(None, "open_q", tmp_path / "out", lmu_data=root, generator=ScriptedByQuestion(["black"]))


def test_missing_lmudata_is_a_skip(tmp_path, monkeypatch):
    monkeypatch.delenv("LMUData", raising=False)
    with pytest.raises(BenchmarkSkipped, match="LMUData"):
        evaluate_vlmeval(None, "toy_mcq", tmp_path / "out")
