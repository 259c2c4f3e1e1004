import subprocess
import sys

from conftest import ROOT, cli_env

FORBIDDEN = ("textual", "plotext", "textual_plotext", "tui", "rich.live")


def test_core_imports_no_ui():
    code = ("import sys, core, core.backend, core.config, core.data, core.models, core.strategies, "
            "core.trainer, core.store, core.events, core.cli\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "print('BAD', bad) if bad else print('CLEAN')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "CLEAN"


SIGINT_DURING_WORK = """
import os, signal, threading, time
import core.backend
flow = core.backend.flow
x = flow.ones(64, 64)
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    start = time.time()
    while time.time() - start < 20:
        x = (x @ x).clamp(max=1.0)
        x.numpy()
    print("NOT INTERRUPTED")
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""


def test_ctrl_c_during_oneflow_work_raises_keyboardinterrupt():
    """Bare `import oneflow` turns this Ctrl-C into a segfault (exit -11); core.backend fixes it."""
    out = subprocess.run([sys.executable, "-c", SIGINT_DURING_WORK], cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip().splitlines()[-1] == "KeyboardInterrupt"
