"""What the machine is doing while a run trains: the training process's CPU and resident memory
and the system's memory (psutil), and each NVIDIA GPU's utilisation, memory and temperature
(NVML, through nvidia-ml-py's `pynvml`), as core.events.MachineSampled.

UI-agnostic. `Probe` takes samples; `Sampler` takes them in a daemon thread (the dashboard's panel
once a second, never on the UI thread); `Recorder` is the trainer's listener that has the
training process sampled every RECORD_SECONDS for metrics.jsonl.

No NVML (no library, no driver, no GPU) or an NVML call failing mid-run is not an error: the
sample has no GPU rows and `Probe.gpu_note` says why. CPU use is a share of ALL logical cores
(100 % = every core busy), so a process with several busy threads never shows more than 100 %.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from core import events as ev

LIVE_SECONDS = 1.0
"""The dashboard's panel samples this often."""
RECORD_SECONDS = 30.0
"""The training process records a sample this often (and once FIRST_RECORD_SECONDS after it starts)."""
FIRST_RECORD_SECONDS = 1.0
"""The first recorded sample: CPU use needs a span to be measured over."""
NO_GPU = "no NVIDIA GPU (NVML not available)"
GIB = 1024 ** 3


class Probe:
    """Takes samples of process `pid` (or of the whole machine) and of the NVIDIA GPUs.

    NVML is initialised once, at the first sample (so in the sampling thread: it can take a while
    on a machine with GPUs), its device handles kept for every later sample, and shut down by
    close(). The CPU share is measured since the previous sample of the same process (psutil's
    cpu_percent(interval=None)): a first sample has none (cpu_percent None)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        """The pynvml module, while NVML is initialised."""
        self._handles: List[Any] = []
        self._nvml_tried = False
        self.gpu_note = ""
        """Why a sample has no GPU rows ("" while it has some), in a few words."""
        self.nvml_error = ""
        """NVML's own words when it could not start (e.g. "NVML Shared Library Not Found")."""
        self._process: Any = None
        self._system_primed = False

    def sample(self, pid: Optional[int] = None) -> ev.MachineSampled:
        """The figures now: of process `pid` when it exists (else machine-wide, pid None)."""
        import psutil

        cpus = psutil.cpu_count() or 1
        cpu, rss, pid = self._process_figures(pid, cpus)
        if pid is None:
            cpu = psutil.cpu_percent(None) if self._system_primed else None
            self._system_primed = True
        memory = psutil.virtual_memory()
        return ev.MachineSampled(t=time.time(), pid=pid, cpu_percent=cpu, cpus=cpus, rss_bytes=rss,
                                 mem_used_bytes=int(memory.total - memory.available),
                                 mem_total_bytes=int(memory.total), gpus=self._gpus())

    def _process_figures(self, pid: Optional[int], cpus: int) -> tuple:
        """(CPU %, resident bytes, pid) of process `pid`, or (None, None, None) when there is no
        such process (gone, not given, not ours to read)."""
        import psutil

        if pid is None:
            self._process = None
            return None, None, None
        try:
            first = self._process is None or self._process.pid != pid
            if first:
                self._process = psutil.Process(pid)
            with self._process.oneshot():
                share = self._process.cpu_percent(None)  # % of ONE core: above 100 with several threads
                rss = self._process.memory_info().rss
        except (psutil.Error, OSError, ValueError):
            self._process = None
            return None, None, None
        return (None if first else min(100.0, share / cpus)), int(rss), pid

    # -- NVML ------------------------------------------------------------------------------------

    def _start_nvml(self) -> None:
        self._nvml_tried = True
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded...; an import failure
            self.gpu_note, self.nvml_error = NO_GPU, _nvml_reason(exc)
            return
        self._nvml = pynvml
        try:
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:
            self.gpu_note, self.nvml_error = NO_GPU, _nvml_reason(exc)
            self.close()
            return
        self.gpu_note = "" if self._handles else "no NVIDIA GPU (NVML found none)"

    def _gpus(self) -> tuple:
        """A row per GPU; a figure that NVML does not give (not supported, a call failing) is None,
        and a GPU that gives none has no row."""
        if not self._nvml_tried:
            self._start_nvml()
        if self._nvml is None:
            return ()
        nvml, rows = self._nvml, []
        for index, handle in enumerate(self._handles):
            util = _ask(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            memory = _ask(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            temp = _ask(lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
            used, total = (int(memory.used), int(memory.total)) if memory is not None else (None, None)
            if any(v is not None for v in (util, used, temp)):
                rows.append(ev.GpuSample(index, util, used, total, temp))
        if not rows and self._handles:
            self.gpu_note = "no GPU figures (NVML stopped answering)"
        return tuple(rows)

    def close(self) -> None:
        """Shut NVML down (once per initialisation: NVML counts them)."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._nvml, self._handles = None, []


def _ask(call: Callable[[], Any]) -> Any:
    """An NVML figure, or None when the call fails (not supported, GPU lost, NVML gone...)."""
    try:
        return call()
    except Exception:
        return None


def _nvml_reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


class Sampler:
    """Calls `callback(sample, gpu_note)` with a Probe's sample of process `target()` every
    `interval` seconds, in a daemon thread of its own, from `first` seconds after start() (0: at
    once, with no CPU figure yet; otherwise a first sample taken at start gives the CPU share a
    span to be measured over). `target` is called in that thread too (it may read a file).
    stop() returns at once; the thread ends within a moment and shuts its NVML down itself.
    An error in a sample or a callback skips that sample: the thread never dies of one."""

    def __init__(self, callback: Callable[[ev.MachineSampled, str], None], interval: float = LIVE_SECONDS,
                 target: Callable[[], Optional[int]] = lambda: None, first: float = 0.0) -> None:
        self.callback, self.interval, self.target, self.first = callback, interval, target, first
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="transferlab-machine", daemon=True)

    def start(self) -> "Sampler":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        probe = Probe()
        try:
            wait = self.first
            if wait > 0:
                self._sample(probe, report=False)
            while not self._stop.wait(wait):
                self._sample(probe)
                wait = self.interval
        finally:
            probe.close()

    def _sample(self, probe: Probe, report: bool = True) -> None:
        try:
            sample = probe.sample(self.target())
            if report:
                self.callback(sample, probe.gpu_note)
        except Exception:
            pass


class Recorder:
    """The training process's listener that records its machine figures: from RunStarted to
    RunFinished a Sampler samples this process every RECORD_SECONDS (the first one
    FIRST_RECORD_SECONDS after the start) and leaves the sample here; the trainer takes it between
    steps (take(): an attribute swap, nothing slower) and emits it like any event, so it reaches
    metrics.jsonl and every listener from the training thread, in order."""

    def __init__(self) -> None:
        self._pending: Optional[ev.MachineSampled] = None
        self._sampler: Optional[Sampler] = None

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted) and self._sampler is None:
            self._sampler = Sampler(self._keep, RECORD_SECONDS, os.getpid, FIRST_RECORD_SECONDS).start()
        elif isinstance(event, ev.RunFinished) and self._sampler is not None:
            self._sampler.stop()

    def _keep(self, sample: ev.MachineSampled, gpu_note: str) -> None:
        self._pending = sample

    def take(self) -> Optional[ev.MachineSampled]:
        """The sample taken since the last call, if any."""
        sample, self._pending = self._pending, None
        return sample


# -- words ---------------------------------------------------------------------------------------


def fmt_gib(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / GIB:.1f}"


def gpu_line(gpu: ev.GpuSample) -> str:
    """"GPU0 87% 10.2/24.0 GiB 71°C" (a figure NVML did not give: "?")."""
    util = "?" if gpu.util_percent is None else f"{gpu.util_percent:.0f}%"
    temp = "?" if gpu.temp_c is None else f"{gpu.temp_c:.0f}°C"
    return f"GPU{gpu.index} {util} {fmt_gib(gpu.mem_used_bytes)}/{fmt_gib(gpu.mem_total_bytes)} GiB {temp}"


def cpu_text(sample: ev.MachineSampled) -> str:
    """"CPU 45% of 2 cores" (of the process, or of the machine when no process was sampled)."""
    cpu = "…" if sample.cpu_percent is None else f"{sample.cpu_percent:.0f}%"
    return f"CPU {cpu} of {sample.cpus} core{'s' if sample.cpus > 1 else ''}"


def machine_lines(sample: ev.MachineSampled, gpu_note: str = "") -> Tuple[str, List[str], List[str]]:
    """A sample in words: whose figures ("process 1234" or "whole machine"), the CPU and memory
    figures, and a line per GPU (or `gpu_note`, or NO_GPU, when it has no GPU rows)."""
    who = f"process {sample.pid}" if sample.pid is not None else "whole machine"
    figures = [cpu_text(sample)]
    if sample.rss_bytes is not None:
        figures.append(f"RSS {fmt_gib(sample.rss_bytes)} GiB")
    figures.append(f"RAM {fmt_gib(sample.mem_used_bytes)}/{fmt_gib(sample.mem_total_bytes)} GiB")
    return who, figures, [gpu_line(g) for g in sample.gpus] or [gpu_note or NO_GPU]
