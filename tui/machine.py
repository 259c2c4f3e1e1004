"""The dashboard's machine panel: what the machine does while a run trains (core.machine).

Two forms of the same figures: a narrow column beside the plots on wide terminals, one line on
narrow ones (the dashboard's CSS shows one or the other). The figures come from a
core.machine.Sampler thread (a live run: its process, once a second) or from the run's recorded
MachineSampled events (a replayed run: the last one); this widget only draws them.
"""
from __future__ import annotations

from typing import Optional

from rich.markup import escape
from textual.message import Message
from textual.widgets import Static

from core import events as ev
from core.machine import NO_GPU, machine_lines


class MachineUpdate(Message):
    """A live sample, posted from the sampling thread (`sampler`: the one that took it, so that
    the samples of a sampler stopped meanwhile are dropped)."""

    def __init__(self, sampler: object, sample: ev.MachineSampled, gpu_note: str) -> None:
        super().__init__()
        self.sampler, self.sample, self.gpu_note = sampler, sample, gpu_note


class MachinePanel(Static):
    """A sample's figures, with where they come from ("live", "recorded", "at the end")."""

    def __init__(self, compact: bool = False, **kwargs) -> None:
        super().__init__("", classes="machine", **kwargs)
        self.compact = compact
        self.sample: Optional[ev.MachineSampled] = None

    def show(self, sample: ev.MachineSampled, how: str, gpu_note: str = "") -> None:
        self.sample = sample
        who, figures, gpus = machine_lines(sample, gpu_note)
        if self.compact:  # one line in 80 columns: short words, the GPUs before the memory
            gpus = ["no NVIDIA GPU" if line == NO_GPU else line for line in gpus]
            label = {"live": "machine", "at the end": "ended"}.get(how, how) + (" (whole machine)" if sample.pid is None else "")
            self.update(f"[b]{escape(label)}[/b]: " + escape(" · ".join(figures[:1] + gpus + figures[1:])))
        else:
            if sample.pid is None:
                who += " (the run's process is not on this machine)"
            self.update(f"[b]machine[/b] {escape(how)}\n" + escape("\n".join([who, *figures, *gpus])))
