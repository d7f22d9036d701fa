"""What the benchmark measures besides throughput: the machine's matmul peak,
peak memory of a phase and a description of the machine."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def matmul_gflops(n: int, seconds: float = 1.0, windows: int = 3) -> float:
    """Best fp32 GFLOP/s of an (n, n) @ (n, n) matmul over a few timed windows."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up: thread pool, page faults
    best = 0.0
    for _ in range(windows):
        reps, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            torch.mm(a, b, out=c)
            reps += 1
        best = max(best, 2.0 * n**3 * reps / elapsed / 1e9)
    return best


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 3072)) -> dict[str, float]:
    """GFLOP/s per square size; the machine's peak is the largest."""
    return {str(n): round(matmul_gflops(n), 1) for n in sizes}


def status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_high_water_mark() -> bool:
    """Resets the kernel's peak-RSS counter of this process (Linux >= 4.0)."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Peak resident memory of this process during a `with` block, above what
    it held when the block began (MiB). Uses the kernel's own high-water mark,
    reset at the start; where that cannot be reset, a thread samples RSS every 5 ms."""

    start_mib: float = 0.0
    peak_mib: float = 0.0
    method: str = ""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.start_mib = (status_kib("VmRSS") or 0) / 1024
        self._stop = threading.Event()
        if reset_high_water_mark() and status_kib("VmHWM") is not None:
            self.method = "VmHWM after clear_refs"
        else:
            self.method = "RSS sampled every 5 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while not self._stop.wait(0.005):
            self.peak_mib = max(self.peak_mib, process.memory_info().rss / 2**20)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.method.startswith("VmHWM"):
            self.peak_mib = (status_kib("VmHWM") or 0) / 1024
        else:
            self._thread.join()

    @property
    def increase_mib(self) -> float:
        return max(0.0, self.peak_mib - self.start_mib)


def cpu_model() -> str:
    """The CPU's model name as lscpu reports it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "avx512": "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
