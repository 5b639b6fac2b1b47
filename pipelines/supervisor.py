"""Run a command in a process group of its own and stop the whole group when told to or orphaned.

    python -m pipelines.supervisor PARENT_PID CMD [ARGS ...]

`dvc repro` runs under this supervisor (pipelines.dvc_runner). When a Prefect flow run is cancelled
or crashes, Prefect kills the flow-run process; DVC would then die without stopping the stage
command it started (a training job left running on the GPU). The supervisor stops its whole group
instead: when it is signalled (SIGTERM/SIGINT), and, on Linux, when the process that started it
(PARENT_PID) dies (PR_SET_PDEATHSIG, and a poll of the parent as a fallback). It exits with the
command's exit status. Only the standard library: it starts before anything else is imported.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_SECONDS = 15  # between SIGTERM to the group and SIGKILL


def main(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[1:]
    stopping: list[float] = []

    def on_signal(*_):
        stopping.append(time.monotonic())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except Exception:  # noqa: BLE001 - not Linux: the parent poll below still works
        pass
    child, sent = subprocess.Popen(cmd), False
    while True:
        try:
            rc = child.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent and not stopping:  # the process that started us is gone
            stopping.append(time.monotonic())
        if stopping and not sent:
            sent = True
            os.killpg(0, signal.SIGTERM)
        if stopping and time.monotonic() - stopping[0] > GRACE_SECONDS:
            os.killpg(0, signal.SIGKILL)
    if stopping:
        os.killpg(0, signal.SIGKILL)  # whatever the stage command left behind
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
