"""One error type for bad input, with a message that names what, where and the fix."""

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


class SettingError(DPAInputError):
    """A setting out of range. `key` is the field of the settings object (None: its fields together), so
    that a settings file can name the full key path (pipelines/params.py prefixes where it sits)."""

    def __init__(self, key: str | None, problem: str, *, fix: str):
        self.key, self.detail = key, problem
        super().__init__(f"{key} {problem}" if key else problem, fix=fix)
