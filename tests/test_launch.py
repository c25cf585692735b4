"""launch.py: its flags, and its venv and install steps (with pip and exec recorded, not run)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ("port", "listen", "share", "api", "nowebui", "models-dir", "ckpt-dir", "lora-dir", "vae-dir",
         "text-encoder-dir", "outdir", "device", "no-half", "no-half-vae", "lowvram", "medvram", "always-gpu",
         "always-offload-from-vram", "skip-venv", "skip-install", "api-auth", "api-log", "gradio-auth")


def run_launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def launch(monkeypatch):
    spec = importlib.util.spec_from_file_location("launch", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv(module.REEXEC_MARK, raising=False)
    return module


def test_help_lists_every_flag():
    result = run_launch("--help")
    assert result.returncode == 0, result.stderr
    for flag in FLAGS:
        assert f"--{flag}" in result.stdout
    assert "launcher" in result.stdout


def test_unknown_flag_is_an_error():
    result = run_launch("--skip-venv", "--skip-install", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr
    assert "usage: launch.py" in result.stderr


def test_logins_are_user_pass_pairs_and_open_access_is_warned_about():
    from webui.cli import parse_args
    from webui.server import open_access_warnings

    args = parse_args(["--api-auth", "alice:pa:ss, bob:x", "--gradio-auth", "carol:y"])
    assert args.api_auth == [("alice", "pa:ss"), ("bob", "x")] and args.gradio_auth == [("carol", "y")]
    assert parse_args(["--gradio-auth", "carol:y"]).api_auth == [("carol", "y")], "one login for everything"
    result = run_launch("--skip-venv", "--skip-install", "--api-auth", "alice")
    assert result.returncode == 2 and "'alice' is not USER:PASS" in result.stderr
    assert open_access_warnings(parse_args([])) == [], "local only"
    warned = open_access_warnings(parse_args(["--listen", "--api"]))
    assert len(warned) == 2 and "--api-auth" in warned[0] and "--gradio-auth" in warned[1]
    assert open_access_warnings(parse_args(["--listen", "--nowebui", "--api-auth", "a:b"])) == []
    assert "public --share link" in open_access_warnings(parse_args(["--share", "--api-auth", "a:b"]))[0]
    assert open_access_warnings(parse_args(["--listen", "--api", "--gradio-auth", "a:b"])) == []


def test_venv_is_the_project_one_unless_webui_venv_says(launch, monkeypatch, tmp_path):
    monkeypatch.delenv("WEBUI_VENV", raising=False)
    assert launch.venv_dir() == ROOT / ".venv"
    monkeypatch.setenv("WEBUI_VENV", str(tmp_path))
    assert launch.venv_dir() == tmp_path.resolve()
    monkeypatch.setenv("WEBUI_VENV", sys.prefix)
    assert launch.in_venv(launch.venv_dir())


def test_enter_venv_creates_it_then_reexecs(launch, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(launch.os, "execv", lambda path, args: calls.append([str(path), *args]))
    launch.enter_venv(tmp_path / "venv", ["--port", "7861"])
    python = str(launch.venv_python(tmp_path / "venv"))
    assert calls == [[sys.executable, "-m", "venv", str(tmp_path / "venv")],
                     [python, python, str(ROOT / "launch.py"), "--port", "7861"]]


def test_enter_venv_stops_a_reexec_loop(launch, monkeypatch, tmp_path):
    monkeypatch.setenv(launch.REEXEC_MARK, "1")
    with pytest.raises(SystemExit, match="still not inside"):
        launch.enter_venv(tmp_path, [])


def test_missing_modules(launch, monkeypatch):
    monkeypatch.setattr(launch, "REQUIRED_MODULES", ("json", "no_such_module_for_webui"))
    assert launch.missing_modules() == ["no_such_module_for_webui"]
    monkeypatch.setattr(launch, "CUDA_MODULES", ("no_such_cuda_module",))
    assert launch.missing_modules(cuda=True) == ["no_such_module_for_webui", "no_such_cuda_module"]


def record_pip(launch, monkeypatch, results: list[bool]) -> list[tuple[str, ...]]:
    calls = []

    def pip_install(*args: str) -> bool:
        calls.append(args)
        return results.pop(0)

    monkeypatch.setattr(launch, "pip_install", pip_install)
    return calls


def test_cpu_torch_first_then_the_project(launch, monkeypatch):
    monkeypatch.setattr(launch, "missing_modules", lambda cuda: ["torch", "gradio"])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: False)
    calls = record_pip(launch, monkeypatch, [False, True, True])  # the CPU index is unreachable here
    launch.install_requirements()
    assert calls == [("torch==2.13.0", "--extra-index-url", "https://download.pytorch.org/whl/cpu"),
                     ("torch==2.13.0",), ("-e", str(ROOT))]


def test_cuda_torch_with_an_nvidia_gpu(launch, monkeypatch):
    monkeypatch.setattr(launch, "missing_modules", lambda cuda: ["torch", "bitsandbytes"] if cuda else ["torch"])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: True)
    calls = record_pip(launch, monkeypatch, [True, True])
    launch.install_requirements()
    assert calls == [("torch",), ("-e", f"{ROOT}[cuda]")], "with the CUDA extras (bitsandbytes)"


def test_nothing_installed_when_nothing_is_missing(launch, monkeypatch):
    monkeypatch.setattr(launch, "missing_modules", lambda cuda: [])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: False)
    calls = record_pip(launch, monkeypatch, [])
    launch.install_requirements()
    assert calls == []


def test_failed_install_stops_with_a_message(launch, monkeypatch):
    monkeypatch.setattr(launch, "missing_modules", lambda cuda: ["gguf"])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: False)
    record_pip(launch, monkeypatch, [False])
    with pytest.raises(SystemExit, match="Could not install"):
        launch.install_requirements()
