"""System samples: GPU memory/utilisation per device (NVML), torch peak memory, process RSS/CPU;
and ``rank_memory``, one process's own figures, which a distributed run gathers from every rank.

On a machine without a GPU or an NVIDIA driver every GPU field is empty and `gpu_status` says
"no GPU" with the reason; nothing here raises.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


# What rank_memory returns, in order (a list of floats: what an all-gather carries).
RANK_MEMORY_FIELDS = ("rss_mb", "gpu_mem_mb")
NO_VALUE = -1.0  # gpu_mem_mb without a GPU (or NVML) for this rank

_PROCESS: psutil.Process | None = None
# NVML, once: {"nvml": the module or None} and CUDA index -> NVML handle (None: NVML cannot see it)
_NVML_CACHE: dict = {}


def rank_memory(device) -> list[float]:
    """``[rss_mb, gpu_mem_mb]`` of this process: its resident memory, and the memory NVML reports
    used on its own GPU (`device`, a torch.device; NO_VALUE on the CPU or without NVML). Cheap
    enough for every logged step: one /proc read and, on a GPU, one NVML query."""
    global _PROCESS
    if _PROCESS is None or _PROCESS.pid != os.getpid():  # a forked child is another process
        _PROCESS = psutil.Process(os.getpid())
    rss_mb = round(_PROCESS.memory_info().rss / 2**20, 1)
    return [rss_mb, _gpu_mem_mb(device)]


def _gpu_mem_mb(device) -> float:
    if getattr(device, "type", None) != "cuda":
        return NO_VALUE
    torch = sys.modules.get("torch")
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = _nvml_handle(torch, index)
        if handle is None:
            return NO_VALUE
        return round(_NVML_CACHE["nvml"].nvmlDeviceGetMemoryInfo(handle).used / 2**20, 1)
    except Exception:  # a driver hiccup must never stop training: no figure this time
        return NO_VALUE


def _nvml_handle(torch, index: int):
    """The NVML handle of CUDA device `index`. Found by PCI bus id, not by index: CUDA numbers
    the devices CUDA_VISIBLE_DEVICES lets it see (rank 3's cuda:0 may be NVML's GPU 3)."""
    if index in _NVML_CACHE:
        return _NVML_CACHE[index]
    if "nvml" not in _NVML_CACHE:
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML_CACHE["nvml"] = pynvml
        except Exception:
            _NVML_CACHE["nvml"] = None
    nvml, handle = _NVML_CACHE["nvml"], None
    if nvml is not None:
        try:
            props = torch.cuda.get_device_properties(index)
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            handle = nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:
            handle = None
    _NVML_CACHE[index] = handle
    return handle


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


def rank_rows(world, device) -> list[dict]:
    """Every rank's `rank_memory`, gathered (a collective: every rank calls it), as the rows of
    a `ranks` event."""
    rows = world.all_gather(rank_memory(device))
    return [{"rank": r, "host": None, "rss_mb": rss, "gpu_mem_mb": gpu if gpu >= 0 else None}
            for r, (rss, gpu) in enumerate(rows)]


@dataclass(frozen=True)
class Check:
    """One line of `widen doctor`: what was checked, what was found, and whether it is fine."""

    name: str
    found: str
    ok: bool = True


def readiness(runs_root: Path) -> list[Check]:
    """Is this machine ready to run: Python, torch, CUDA, NVML and each GPU, the runs root, the
    free disk under it (at least 1 GiB)."""
    import shutil

    checks = [Check("python", sys.version.split()[0])]
    try:
        import torch

        checks.append(Check("torch", torch.__version__))
        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            checks.append(Check("CUDA", f"{torch.version.cuda}: {names}"))
        else:
            checks.append(Check("CUDA", "no GPU (torch sees no CUDA device) — runs use the CPU"))
    except ImportError as e:
        checks.append(Check("torch", f"missing ({e}) — run `make setup`", False))
    monitor = SystemMonitor()
    checks.append(Check("NVML", monitor.gpu_status))
    for gpu in monitor.gpus():
        checks.append(Check(f"GPU{gpu['index']}", f"{gpu.get('name')}: {gpu.get('mem_used_mb')}/"
                                                  f"{gpu.get('mem_total_mb')} MB, {gpu.get('util_percent')}% busy"))
    probe = runs_root if runs_root.exists() else Path.cwd()
    free_gb = shutil.disk_usage(probe).free / 2**30
    checks.append(Check("runs root", f"{runs_root} ({'exists' if runs_root.exists() else 'created on first run'})"))
    checks.append(Check("disk free", f"{free_gb:.1f} GiB", free_gb > 1))
    return checks
