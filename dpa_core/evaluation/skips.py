"""A benchmark that cannot run here (data not available offline, extra not installed) is skipped with
a reason, never scored: evaluate_all records the reason in report.json and writes no metric for it."""

from __future__ import annotations


class BenchmarkSkipped(RuntimeError):
    def __init__(self, benchmark: str, reason: str):
        self.benchmark, self.reason = benchmark, reason
        super().__init__(f"benchmark {benchmark!r} skipped: {reason}")
