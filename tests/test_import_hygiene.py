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


def test_cuda_libraries_elsewhere_are_preloaded_by_import_core(tmp_path):
    """nvidia wheels outside oneflow's site-packages (e.g. the user site): `import core` dlopens
    them, so `import oneflow` needs no LD_LIBRARY_PATH."""
    import nvidia

    real = next(p for p in (__import__("pathlib").Path(x) for x in nvidia.__path__) if (p / "cudnn" / "lib").is_dir())
    for package in ("cudnn", "cublas"):
        (tmp_path / "nvidia" / package / "lib").mkdir(parents=True)
        for lib in (real / package / "lib").glob("*.so*"):
            (tmp_path / "nvidia" / package / "lib" / lib.name).symlink_to(lib)
    code = ("import core, oneflow\n"
            "print(oneflow.ones(2).sum().item() == 2 and sorted(p.rsplit('/', 1)[1] for p in core.PRELOADED\n"
            f"      if p.startswith({str(tmp_path)!r})))")
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    loaded = out.stdout.strip().splitlines()[-1]
    assert "libcudnn_cnn_train.so.8" in loaded and "libcublas.so.11" in loaded, out.stderr[-2000:]
