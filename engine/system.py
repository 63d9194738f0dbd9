"""System samples: GPU memory/utilisation per device (NVML), torch peak memory, process RSS/CPU.

On a machine without a GPU or an NVIDIA driver every GPU field is empty and `gpu_status` says
"no GPU" with the reason; nothing here raises.
"""

from __future__ import annotations

import os
import time

import psutil


class SystemMonitor:
    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s   # between the samples `due` asks for
        self.last_sample = 0.0
        self.peak_rss_mb = 0.0         # over every sample taken
        self.process = psutil.Process(os.getpid())
        self.process.cpu_percent(None)  # prime: the first call always returns 0
        self._nvml = None
        self.gpu_status = self._init_nvml()

    def _init_nvml(self) -> str:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as e:  # no library, no driver, no device: all mean "no GPU" here
            return f"no GPU (NVML: {_short(e)})"
        if count == 0:
            return "no GPU (NVML found no devices)"
        self._nvml = pynvml
        return f"{count} GPU(s) via NVML"

    def gpus(self) -> list[dict]:
        if self._nvml is None:
            return []
        nvml, out = self._nvml, []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                name = nvml.nvmlDeviceGetName(handle)
                out.append({
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "mem_used_mb": round(mem.used / 2**20, 1),
                    "mem_total_mb": round(mem.total / 2**20, 1),
                    "util_percent": util.gpu,
                })
            except Exception as e:  # e.g. a MIG slice without utilisation counters
                out.append({"index": index, "error": _short(e)})
        return out

    def due(self) -> bool:
        """Whether `interval_s` has passed since the last sample."""
        return time.time() - self.last_sample >= self.interval_s

    def sample(self) -> dict:
        self.last_sample = time.time()
        rss_mb = round(self.process.memory_info().rss / 2**20, 1)
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb)
        return {
            "rss_mb": rss_mb,
            "cpu_percent": self.process.cpu_percent(None),
            "gpus": self.gpus(),
            "gpu_status": self.gpu_status,
            "torch_peak_mb": torch_peak_mb(),
        }


def torch_peak_mb() -> float | None:
    """Peak CUDA memory allocated by this process (None without CUDA or before torch loads)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _short(error: Exception) -> str:
    text = str(error) or error.__class__.__name__
    return text.splitlines()[0][:120]
