import pytest

from core import backend


@pytest.fixture
def fake_hopper(monkeypatch):
    """CUDA present, an H200 (sm_90), and this build's kernels failing on it as they do there."""
    monkeypatch.setattr(backend, "_probe_cache", {})
    monkeypatch.setattr(backend.flow.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend.flow.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(backend.flow.cuda, "get_device_capability", lambda i=0: (9, 0))
    real_ones = backend.flow.ones

    def ones(*args, device=None, **kwargs):
        if device == "cuda":
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return real_ones(*args, **kwargs)

    monkeypatch.setattr(backend.flow, "ones", ones)


def test_unusable_gpu_is_reported_at_start_with_the_fix(fake_hopper):
    for requested in ("auto", "cuda"):
        with pytest.raises(backend.DeviceError) as info:
            backend.pick_device(requested)
        message = str(info.value)
        assert "NVIDIA H200 (sm_90)" in message and "no kernel image" in message
        assert "sm_60-sm_86" in message and "ONEFLOW_PIP=" in message and "--device cpu" in message
    assert backend.pick_device("cpu") == "cpu"


def test_no_gpu_means_cpu_for_auto_and_a_clear_error_for_cuda(monkeypatch):
    monkeypatch.setattr(backend, "_probe_cache", {})
    monkeypatch.setattr(backend.flow.cuda, "is_available", lambda: False)
    assert backend.pick_device("auto") == "cpu"
    with pytest.raises(backend.DeviceError, match="--device cuda was asked for, but no CUDA GPU"):
        backend.pick_device("cuda")


def test_cli_reports_the_gpu_problem_without_a_traceback(fake_hopper, tmp_path, capsys, monkeypatch):
    from core.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--dataset", "digits", "--image-size", "16", "--pretrained", "none"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot run on NVIDIA H200" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
