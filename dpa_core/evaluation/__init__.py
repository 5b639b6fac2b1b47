"""Benchmark evaluation of Llava checkpoints: a built-in TSV scorer, VLMEvalKit datasets, lm-eval text tasks.

The pipeline's evaluate stage is one call, `evaluate_all`. VLMEvalKit is imported only when a
vlmeval benchmark runs, lm-eval only when an lmeval benchmark runs. See docs/evaluation.md.
"""

from ..errors import BenchmarkSkipped
from .answer_extraction import extract_option, match_short_answer
from .builtin_scorer import evaluate_text_oracle, evaluate_tsv
from .evaluate import evaluate_all, evaluate_text_oracles
from .lm_extraction import extract_language_model
from .lmeval import evaluate_lmeval
from .vlmeval_runner import evaluate_vlmeval

__all__ = [
    "BenchmarkSkipped",
    "evaluate_all",
    "evaluate_lmeval",
    "evaluate_text_oracle",
    "evaluate_text_oracles",
    "evaluate_tsv",
    "evaluate_vlmeval",
    "extract_language_model",
    "extract_option",
    "match_short_answer",
]
