"""Atomic outputs: a stage writes to a temporary sibling and renames it into place on success,
so a crash never leaves a directory or file that a later stage (or DVC) takes for finished.
Leftover temporaries of a killed run are removed by the next write of the same output; outputs
get the permissions of the user's umask. Also: content hashes of inputs (for resume fingerprints)
and OS errors (disk full) turned into one line naming the path."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DPAStorageError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the output what a plain mkdir/open would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def clean_stale(final: Path) -> None:
    """Remove temporaries left next to `final` by a killed earlier write of it."""
    for prefix in (f".{final.name}.tmp-", f".{final.name}.old-"):
        for stale in final.parent.glob(prefix + "*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)  # safetensors (Rust) reports it as SafetensorError("... StorageFull ...")
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def storage_error(err: BaseException, path: str | os.PathLike) -> DPAStorageError | None:
    """A one-line DPAStorageError for an OS-level write failure, or None for any other error."""
    if _is_disk_full(err):
        return DPAStorageError(f"no space left on the device while writing {path}.",
                               fix="free disk space (or point runtime.outputs elsewhere) and rerun; "
                               "nothing partial was kept.")
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return DPAStorageError(f"cannot write {path}: {err.strerror}.",
                               fix="make the output directory writable and rerun.")
    if isinstance(err, OSError) and err.errno is not None:
        return DPAStorageError(f"OS error while writing {path}: {err.strerror or err}.",
                               fix="check the file system and rerun.")
    return None


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to `final`; move it to `final` only if the block succeeds.

    An existing `final` is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    _normal_mode(tmp, directory=True)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        short = storage_error(e, final)
        if short is not None:
            raise short from None
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _normal_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        short = storage_error(e, path)
        if short is not None:
            raise short from None
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- content hashes ---------------------------------------------------------------------------

def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_digest(path: str | os.PathLike | None) -> str | None:
    """sha256 of a file's bytes, or of a directory's files (relative names and bytes), following
    links; None for None. What a resume fingerprint records for an input artifact."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()


def stat_digest(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the names, sizes and modification times of many files: for the images a data set
    references (hundreds of thousands at paper scale), where reading every byte at each stage start
    would cost minutes; replacing an image changes its size or mtime."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()
