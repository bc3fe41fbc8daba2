"""What the benchmark measures the machine with: peak memory, matmul peak, device names."""

from __future__ import annotations

import math
import platform
import re
import resource
import time
from pathlib import Path
from typing import Optional

import torch

# Dense bf16 peak TFLOP/s by device name (first match wins).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


class PeakMemory:
    """Peak memory of a phase, in MB: CUDA ``max_memory_allocated``, or on CPU the peak RSS above
    the RSS at construction (the baseline)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.note = "torch.cuda.max_memory_allocated: peak allocated CUDA memory, weights and batches included"
            return
        self.baseline_kb = _proc_status("VmRSS")
        self.resettable = self.baseline_kb is not None and _reset_rss_peak()
        if self.resettable:
            self.note = ("CPU: peak resident set size (VmHWM, reset per phase) minus the RSS right after "
                         "the model and the batches were built")
        else:
            self.baseline_kb = self.baseline_kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.note = ("CPU: the process's peak resident set size since it started (ru_maxrss) minus the "
                         "RSS right after the model and the batches were built; 0 if the build peaked higher")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _reset_rss_peak()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.resettable:
            peak_kb = _proc_status("VmHWM") or 0
        else:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak_kb - self.baseline_kb, 0) / 1024


def _proc_status(key: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_rss_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The best float32 GFLOP/s of an ``n x n`` matmul on the CPU, with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or "cpu")


def gpu_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of a known GPU, by name; None on CPU or for other cards."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batches: list, warmup: int, device: torch.device) -> float:
    """Run ``step`` on the first ``warmup`` batches untimed, then on the rest; their seconds."""
    for batch in batches[:warmup]:
        step(batch)
    sync(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    sync(device)
    return time.perf_counter() - start
