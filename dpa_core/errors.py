"""The errors dpa_core raises on purpose: bad input, with a message that names what, where and the
fix; and a benchmark that cannot run here."""

from __future__ import annotations


class DPAInputError(ValueError):
    """Bad user input (data, config, model pair), raised before any training starts."""

    def __init__(self, problem: str, *, file: object = None, record: object = None, fix: str | None = None):
        self.problem, self.file, self.record, self.fix = problem, file, record, fix
        where = []
        if file is not None:
            where.append(str(file))
        if record is not None:
            where.append(f"record {record!r}")
        msg = (": ".join(where) + ": " if where else "") + problem
        if fix:
            msg += f" Fix: {fix}"
        super().__init__(msg)


class DPAStorageError(DPAInputError):
    """The machine, not the input: disk full, a read-only or unwritable output directory. One line,
    naming the path; nothing partial is left behind (outputs are written atomically)."""


class BenchmarkSkipped(RuntimeError):
    """A benchmark that cannot run here (data not available offline, extra not installed) is skipped
    with a reason, never scored: evaluate_all records the reason in report.json and writes no metric
    for it."""

    def __init__(self, benchmark: str, reason: str):
        self.benchmark, self.reason = benchmark, reason
        super().__init__(f"benchmark {benchmark!r} skipped: {reason}")


class SettingError(DPAInputError):
    """A setting out of range. `key` is the field of the settings object (None: its fields together), so
    that a settings file can name the full key path (pipelines/params.py prefixes where it sits)."""

    def __init__(self, key: str | None, problem: str, *, fix: str):
        self.key, self.detail = key, problem
        super().__init__(f"{key} {problem}" if key else problem, fix=fix)
