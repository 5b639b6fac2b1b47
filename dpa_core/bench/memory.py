"""Peak memory of a stretch of code, measured honestly for each device.

GPU: `torch.cuda.max_memory_allocated` (bytes held by live tensors, allocator cache not counted).
CPU: the kernel's resident-set high-water mark (VmHWM in /proc/self/status), reset through
/proc/self/clear_refs right before the measured steps. Resident memory also counts allocator
slack and the interpreter, so the benchmark runs each (config, method) in a fresh process and
sets MALLOC_MMAP_THRESHOLD_ there, so that freed large tensors leave the resident set at once.
Where clear_refs cannot be written, a background thread samples VmRSS every millisecond instead
(a lower bound on the true peak).
"""

from __future__ import annotations

import re
import threading
import time

import torch

KIB = 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.baseline, m.peak (bytes) and m.method (what was measured)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self.peak = 0
        self.method = ""
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_hwm():
            self.baseline = _status_kib("VmRSS") * KIB
            self.method = "VmHWM (kernel RSS high-water mark) after clear_refs reset"
        else:
            self.baseline = self._sampled = _status_kib("VmRSS") * KIB
            self.method = "VmRSS sampled every 1 ms (lower bound)"
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _status_kib("VmRSS") * KIB)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is None:
            self.peak = _status_kib("VmHWM") * KIB
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = self._sampled
        return False
