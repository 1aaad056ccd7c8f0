"""The worker runs on the ONNX Runtime provider it asked for, or refuses to start.

This machine has the CPU wheel, which does not even list CUDA: an explicit CUDA request
fails at once. A GPU wheel whose CUDA provider does not start is covered through
`check_providers`, with the providers such a session reports.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from model.encoder import ProviderError, check_providers, choose_providers
from model.loaded import LoadedModel
from model.variants import CPU, CUDA, TENSORRT, Selection
from taskmux.local import component_command, component_env, free_port
from workers.settings import WorkerSettings

START_TIMEOUT_S = 120  # loading the model; the process exits as soon as that fails


def _gpu_selection(variant: str = "fp16") -> Selection:
    return Selection(variant, f"encoder.{variant}.onnx", [CUDA, CPU], "test")


def test_explicit_cuda_on_a_cpu_only_runtime_is_refused() -> None:
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        choose_providers([CUDA, CPU])
    assert choose_providers(["auto"]) == [CPU]  # the CPU wheel: auto is CPU


def test_a_session_that_fell_back_to_cpu_is_refused_when_cuda_was_asked_for() -> None:
    fell_back = [CPU]
    with pytest.raises(ProviderError, match="did not start"):
        check_providers([CUDA, CPU], "auto", _gpu_selection(), fell_back)
    with pytest.raises(ProviderError, match="encoder variant fp16"):
        check_providers(["auto"], "fp16", _gpu_selection(), fell_back)
    trt = Selection("fp16", "encoder.fp16.onnx", [TENSORRT, CUDA, CPU], "test")
    with pytest.raises(ProviderError, match=TENSORRT):
        check_providers([TENSORRT, CUDA, CPU], "fp16", trt, [CUDA, CPU])


def test_auto_falls_back_and_a_running_gpu_passes() -> None:
    assert check_providers(["auto"], "auto", _gpu_selection(), [CPU]) is False
    assert check_providers(["auto"], "fp32", _gpu_selection("fp32"), [CPU]) is False
    assert check_providers([CUDA, CPU], "auto", _gpu_selection(), [CUDA, CPU]) is True
    cpu = Selection("fp32", "encoder.onnx", [CPU], "test")
    assert check_providers([CPU], "fp32", cpu, [CPU]) is True


def _run_worker(model_repo: Path, **env: str) -> subprocess.CompletedProcess[str]:
    extra = {
        "TASKMUX_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
        "TASKMUX_METRICS_ADDR": "",
        "TASKMUX_LOG_FORMAT": "text",
        **env,
    }
    # No Redis at this address: the worker must fail on its providers before it connects.
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    return subprocess.run(
        component_command("workers"),
        env=component_env(redis_url, model_repo, extra),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


@pytest.mark.integration
def test_worker_asked_for_cuda_exits_with_what_to_fix(model_repo: Path) -> None:
    done = _run_worker(model_repo, TASKMUX_PROVIDERS=f"{CUDA},{CPU}")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "cannot run the encoder on the providers asked for" in output
    assert "TASKMUX_PROVIDERS asks for ['CUDAExecutionProvider']" in output
    assert "Traceback" not in output


def test_auto_runs_on_cpu_here(model_repo: Path) -> None:
    model = LoadedModel.load(WorkerSettings(model_repo=model_repo, providers=("auto",)))
    assert model.encoder.provider == CPU
    assert model.encoder.session.get_providers()[0] == CPU
