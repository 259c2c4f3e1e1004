"""The machine panel and record (core.machine): samples with and without NVML, their words, the
MachineSampled record read back from a file, the dashboard's sampling thread, a run's records."""
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import core.machine as machine
from core import events as ev
from core.machine import NO_GPU, Probe, machine_lines
from core.store import read_events


GIB = 1024 ** 3


def fake_nvml(fail=False):
    """A pynvml stand-in with two GPUs: GPU0 busy and warm, GPU1 without a temperature sensor.
    `fail`: a one-element list; set its item to make every device call fail (a GPU lost mid-run)."""
    import pynvml

    calls = {"init": 0, "shutdown": 0, "handles": 0}
    broken = fail or [False]
    gpus = [(87, int(10.2 * GIB), 24 * GIB, 71), (5, GIB // 2, 8 * GIB, None)]

    def device(index, what):
        if broken[0]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        value = gpus[index][what]
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def handle(i):
        calls["handles"] += 1
        return i

    fake = types.ModuleType("pynvml")
    fake.NVMLError, fake.NVML_TEMPERATURE_GPU = pynvml.NVMLError, 0
    fake.nvmlInit = lambda: calls.__setitem__("init", calls["init"] + 1)
    fake.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)
    fake.nvmlDeviceGetCount = lambda: len(gpus)
    fake.nvmlDeviceGetHandleByIndex = handle
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=device(h, 0), memory=0)
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=device(h, 1), total=gpus[h][2])
    fake.nvmlDeviceGetTemperature = lambda h, sensor: device(h, 3)
    return fake, calls, broken


def test_without_nvml_a_sample_has_no_gpu_rows_and_no_error(monkeypatch):
    import pynvml

    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)  # what a machine without a driver raises

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    probe = Probe()
    first, second = probe.sample(os.getpid()), probe.sample(os.getpid())
    probe.close()
    assert first.gpus == second.gpus == () and probe.gpu_note == NO_GPU
    assert "Driver Not Loaded" in probe.nvml_error
    assert first.cpu_percent is None and 0 <= second.cpu_percent <= 100  # % of all cores
    assert second.pid == os.getpid() and second.rss_bytes > 0 and 0 < second.mem_used_bytes <= second.mem_total_bytes
    who, figures, gpus = machine_lines(second, probe.gpu_note)
    assert who == f"process {os.getpid()}" and gpus == [NO_GPU] and figures[0].startswith("CPU ")

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    wide = Probe().sample(gone.pid)  # the run's process is gone: the whole machine's figures
    assert wide.pid is None and wide.rss_bytes is None and machine_lines(wide)[0] == "whole machine"


def test_nvml_figures_are_shown_and_recorded_and_a_failing_gpu_is_no_error(monkeypatch):
    fake, calls, broken = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = Probe()
    sample = probe.sample(os.getpid())
    probe.sample(os.getpid())
    assert calls["init"] == 1 and calls["handles"] == 2  # NVML started once, its handles kept
    assert machine_lines(sample)[2] == ["GPU0 87% 10.2/24.0 GiB 71°C", "GPU1 5% 0.5/8.0 GiB ?"]
    line = json.dumps(ev.to_record(sample)).encode()
    assert ev.from_line(line) == sample  # the record in metrics.jsonl reads back as it was

    broken[0] = True  # the GPUs stop answering mid-run
    lost = probe.sample(os.getpid())
    assert lost.gpus == () and "NVML" in probe.gpu_note
    probe.close()
    assert calls["shutdown"] == 1


def test_malformed_machine_records_are_rejected():
    good = {"event": "MachineSampled", "t": 1.0, "pid": 7, "cpu_percent": 50.0, "cpus": 2, "rss_bytes": 10,
            "mem_used_bytes": 5, "mem_total_bytes": 9,
            "gpus": [{"index": 0, "util_percent": 87, "mem_used_bytes": 1, "mem_total_bytes": 2, "temp_c": 71}]}
    assert ev.from_record(good).gpus[0].util_percent == 87.0
    bad = [{"cpu_percent": "50"}, {"cpu_percent": -1.0}, {"rss_bytes": -5}, {"cpus": 0}, {"pid": 1.5},
           {"gpus": {"index": 0}}, {"gpus": [{"util_percent": 3}]}, {"gpus": [{"index": 0, "temp_c": "hot"}]},
           {"gpus": [{"index": 0, "mem_used_bytes": -1}]}, {"gpus": [{"index": 0}] * 65}, {"gpus": [[0]]},
           {"mem_total_bytes": float("nan")}, {"t": None}]
    for change in bad:
        line = json.dumps({**good, **change}).encode()
        assert ev.from_line(line) is None, change
    assert ev.from_line(json.dumps({k: v for k, v in good.items() if k != "cpus"}).encode()) is None


def test_a_tiny_run_records_its_machine_in_metrics(tiny_cfg, monkeypatch):
    from core.trainer import train

    monkeypatch.setattr(machine, "FIRST_RECORD_SECONDS", 0.2)  # the first record soon after the start
    finished = train(tiny_cfg)
    assert finished.status == ev.COMPLETED
    [run_dir] = Path(tiny_cfg.runs_dir).iterdir()
    events = read_events(run_dir)
    samples = [e for e in events if isinstance(e, ev.MachineSampled)]
    assert samples, [type(e).__name__ for e in events]
    assert samples[0].pid == os.getpid() and samples[0].rss_bytes > 0 and samples[0].cpu_percent is not None
    kinds = [type(e) for e in events]
    assert kinds.index(ev.RunStarted) < kinds.index(ev.MachineSampled) < kinds.index(ev.RunFinished)


class IdleRun:
    """A run that trains nowhere: what the dashboard needs to sample its machine."""

    here = True

    def __init__(self):
        self.listeners, self.history = [], []

    def machine_pid(self):
        return os.getpid()


async def test_the_dashboard_samples_the_machine_off_the_ui_thread(tmp_path, monkeypatch):
    from tui.app import TransferLabApp
    from tui.dashboard import DashboardScreen
    from tui.machine import MachinePanel
    from test_tui import tiny, wait_until

    fake, calls, _ = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    threads = []
    real = Probe.sample

    def recorded(self, pid=None):
        threads.append(threading.current_thread())
        return real(self, pid)

    monkeypatch.setattr(Probe, "sample", recorded)
    monkeypatch.setattr(machine, "LIVE_SECONDS", 0.05)
    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=(130, 36)) as pilot:
        screen = DashboardScreen()
        await app.push_screen(screen)
        screen.show_run(IdleRun())
        column, line = screen.query_one("#machine", MachinePanel), screen.query_one("#machine-line", MachinePanel)
        await wait_until(pilot, lambda: len(threads) >= 3 and column.sample is not None, timeout=20)
        text = str(column.render())
        assert "GPU0 87% 10.2/24.0 GiB 71°C" in text and f"process {os.getpid()}" in text
        assert column.display and not line.display  # 130 columns: the column, not the line
        assert threading.main_thread() not in threads
        sampler = screen.sampler
        screen.dismiss()
        await pilot.pause()
        sampler.thread.join(5)
        assert not sampler.thread.is_alive() and calls["shutdown"] == 1  # stopped with its screen


def replay_with_machine():
    """The recorded finetune run of tests/data with a machine record of two GPUs (fixed figures:
    snapshots never show live ones), opened as a replay (which samples nothing)."""
    from tui.dashboard import DashboardScreen

    run = Path("tests/data/runs/20261129-054304-finetune-digits")  # relative: the pictures show the path
    events = read_events(run)
    recorded = ev.MachineSampled(t=1.0, pid=4242, cpu_percent=93.0, cpus=8, rss_bytes=3 * GIB, mem_used_bytes=12 * GIB,
                                 mem_total_bytes=31 * GIB, gpus=(ev.GpuSample(0, 87.0, int(10.2 * GIB), 24 * GIB, 71.0),
                                                                 ev.GpuSample(1, 5.0, GIB // 2, 8 * GIB, None)))
    return DashboardScreen(events=[*events[:-1], recorded, events[-1]])


@pytest.mark.parametrize("size", [(130, 32), (80, 24)], ids=["130x32", "80x24"])
def test_snapshot_recorded_machine_panel(snap_compare, monkeypatch, size):
    """Wide: a column beside the plots; 80x24: one line above the status (the plots keep their room)."""
    from test_snapshots import make_app

    monkeypatch.chdir(Path(__file__).resolve().parents[1])

    async def open_replay(pilot):
        await pilot.pause()
        await pilot.app.push_screen(replay_with_machine())
        await pilot.pause(0.3)

    assert snap_compare(make_app(), terminal_size=size, run_before=open_replay)


def test_the_panel_samples_the_process_named_by_the_runs_heartbeat(tmp_path):
    """A run trained by another process (background, attached): the pid in its heartbeat.json when
    that process trains here, else none (the panel then shows the whole machine and says so)."""
    from core.live import HEARTBEAT_FILE, identity, training_pid
    from core.runner import Remote
    from core.store import atomic_write_json

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    beat = {**identity(), "updated": time.time()}
    cases = [(beat, os.getpid()), ({**beat, "host": "elsewhere.example"}, None), ({**beat, "pid": gone.pid}, None)]
    for written, expected in cases:
        atomic_write_json(tmp_path / HEARTBEAT_FILE, written)
        assert training_pid(tmp_path) == expected and Remote(tmp_path).machine_pid() == expected
    (tmp_path / HEARTBEAT_FILE).unlink()
    assert Remote(tmp_path).machine_pid() is None and Remote(None).machine_pid() is None
