"""Build-time guard for the DPA images: the importable torch must be the locked one.

    python check_torch.py CONSTRAINTS --expect {cuda,cpu} [--outside-prefix]

Reads the ``torch==X`` pin from the constraints file (the project's lock) and exits non-zero
unless ``import torch`` gives version X (any local label: ``+cpu``, ``+cu130``) built for the
expected device kind. ``--outside-prefix`` also requires torch to come from outside
``sys.prefix`` (the GPU image's venv must see the base image's torch, not a second copy that
pip pulled into the venv). Needs no GPU: it checks how torch was built, not the hardware.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_PIN = re.compile(r"^torch==([^\s;#]+)", re.IGNORECASE)


def locked_torch_version(constraints_text: str) -> str:
    """The version pinned for torch in a pip constraints file."""
    for line in constraints_text.splitlines():
        match = _PIN.match(line.strip())
        if match:
            return match.group(1)
    raise ValueError("no 'torch==' pin in the constraints file")


def problems(
    locked: str,
    version: str,
    cuda: str | None,
    torch_file: str,
    prefix: str,
    expect: str,
    outside_prefix: bool,
) -> list[str]:
    """Why the importable torch does not match the lock (empty list when it does)."""
    found = []
    public = version.split("+", 1)[0]
    if public != locked:
        found.append(f"torch {version} is importable but constraints.txt locks torch=={locked}")
    if expect == "cuda" and cuda is None:
        found.append(f"torch {version} is a CPU-only build; this image needs a CUDA build")
    if expect == "cpu" and cuda is not None:
        found.append(f"torch {version} is a CUDA {cuda} build; this image wants the CPU wheel")
    if outside_prefix and Path(torch_file).resolve().is_relative_to(Path(prefix).resolve()):
        found.append(f"torch was installed into {prefix} ({torch_file}) instead of coming from the base image")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("constraints", type=Path)
    parser.add_argument("--expect", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--outside-prefix", action="store_true")
    args = parser.parse_args(argv)

    import torch

    locked = locked_torch_version(args.constraints.read_text())
    found = problems(
        locked,
        torch.__version__,
        torch.version.cuda,
        torch.__file__,
        sys.prefix,
        args.expect,
        args.outside_prefix,
    )
    for line in found:
        print(f"check_torch: {line}", file=sys.stderr)
    if not found:
        print(f"check_torch: torch {torch.__version__} (cuda={torch.version.cuda}) matches the lock")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
