"""launch.py: its flags, and its venv and install steps (with pip and exec recorded, not run)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.live import start_server

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ("port", "listen", "share", "api", "nowebui", "models-dir", "ckpt-dir", "lora-dir", "vae-dir",
         "text-encoder-dir", "outdir", "device", "no-half", "no-half-vae", "lowvram", "medvram", "always-gpu",
         "always-offload-from-vram", "skip-venv", "skip-install", "api-auth", "api-log", "gradio-auth",
         "server-name", "ckpt", "theme", "autolaunch", "cors-allow-origins", "cors-allow-origins-regex", "precision",
         "gradio-auth-path", "use-cpu", "loglevel")


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
    no_effect = result.stdout.split("A1111/Forge flags accepted without effect:")[1]
    for flag in ("--xformers", "--opt-sdp-attention", "--enable-insecure-extension-access", "--no-download-sd-model",
                 "--sub-quad-q-chunk-size N", "--directml [N]"):
        assert flag in no_effect
    assert "[--xformers]" not in result.stdout, "the usage line keeps to the flags that act"


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
    assert parse_args(["--api-auth", "a:b"]).gradio_auth == [("a", "b")], "the UI's routes generate too"
    assert open_access_warnings(parse_args(["--share", "--api-auth", "a:b"])) == []
    assert "public --share link" in open_access_warnings(parse_args(["--share"]))[0]
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


@pytest.mark.parametrize("reachable", [True, False])
def test_cpu_torch_and_its_torchvision_first_then_the_project(launch, monkeypatch, reachable):
    """Without a GPU: the CPU builds from PyTorch's CPU index (their "+cpu" matches nothing else), else, where that
    index cannot be reached (as on this project's machines), the pair PyPI built together."""
    monkeypatch.setattr(launch, "missing_modules", lambda cuda, tests, serve=False: ["torchvision", "gradio"])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: False)
    calls = record_pip(launch, monkeypatch, [reachable, True, True])
    launch.install_requirements()
    cpu_index = ("torch==2.13.0", "torchvision==0.28.0+cpu", "--extra-index-url", "https://download.pytorch.org/whl/cpu",
                 "--retries", "1")
    fallback = [] if reachable else [("torch==2.14.1", "torchvision==0.29.1")]
    assert calls == [cpu_index, *fallback, ("-e", str(ROOT))]


def test_cuda_torch_with_an_nvidia_gpu(launch, monkeypatch):
    monkeypatch.setattr(launch, "missing_modules", lambda cuda, tests, serve=False: ["torch", "bitsandbytes"] if cuda else ["torch"])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: True)
    calls = record_pip(launch, monkeypatch, [True, True])
    launch.install_requirements()
    assert calls == [("torch", "torchvision"), ("-e", f"{ROOT}[cuda]")], "with the CUDA extras (bitsandbytes)"


@pytest.mark.parametrize("cuda,extras", [(False, "[test]"), (True, "[cuda,test]")])
def test_run_tests_installs_the_test_tools_then_runs_pytest_on_every_core(launch, monkeypatch, cuda, extras):
    monkeypatch.setattr(launch, "missing_modules", lambda cuda, tests, serve=False: ["xdist"] if tests else [])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: cuda)
    calls = record_pip(launch, monkeypatch, [True])
    launch.install_requirements(tests=True)
    assert calls == [("-e", f"{ROOT}{extras}")]
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(launch.os, "chdir", lambda path: calls.append(path))
    monkeypatch.setattr(launch.os, "execv", lambda path, args: calls.append(args))
    launch.run_tests(["-x", "tests/test_launch.py"])
    launch.run_tests(["-n", "1"])
    assert calls[1:] == [ROOT, [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadscope", "-x",
                                "tests/test_launch.py"], ROOT, [sys.executable, "-m", "pytest", "-n", "1"]]


def test_test_modules_are_the_test_extra(launch):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    names = {name.split(">")[0].split("=")[0].split("[")[0].replace("pytest-xdist", "xdist") for name in extra}
    assert names == set(launch.TEST_MODULES)
    serve = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert {name.split("[")[0] for name in serve} == set(launch.SERVE_MODULES)


def test_workers_install_ray_serve(launch, monkeypatch):
    """--workers or --ray-address: Ray Serve (the extra "serve") is installed where it is missing."""
    monkeypatch.setattr(launch, "missing_modules", lambda cuda, tests, serve=False: ["ray"] if serve else [])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: False)
    calls = record_pip(launch, monkeypatch, [True])
    launch.install_requirements()
    assert calls == [], "not without the flags"
    launch.install_requirements(serve=True)
    assert calls == [("-e", f"{ROOT}[serve]")]


def test_k_diffusion_goes_in_without_its_dependencies(launch, monkeypatch):
    monkeypatch.setattr(launch, "missing_modules", lambda cuda, tests, serve=False: ["gradio", "k_diffusion"])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: False)
    calls = record_pip(launch, monkeypatch, [True, True])
    launch.install_requirements()
    assert calls == [("-e", str(ROOT)), ("--no-deps", "k-diffusion==0.1.1.post1")]
    monkeypatch.setattr(launch, "missing_modules", lambda cuda, tests, serve=False: ["k_diffusion"])
    calls = record_pip(launch, monkeypatch, [False])
    with pytest.raises(SystemExit, match="Could not install k-diffusion"):
        launch.install_requirements()
    assert calls == [("--no-deps", "k-diffusion==0.1.1.post1")], "alone: the project is in already"


def test_nothing_installed_when_nothing_is_missing(launch, monkeypatch):
    monkeypatch.setattr(launch, "missing_modules", lambda cuda, tests, serve=False: [])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: False)
    calls = record_pip(launch, monkeypatch, [])
    launch.install_requirements()
    assert calls == []


def test_failed_install_stops_with_a_message(launch, monkeypatch):
    monkeypatch.setattr(launch, "missing_modules", lambda cuda, tests, serve=False: ["gguf"])
    monkeypatch.setattr(launch, "has_nvidia_gpu", lambda: False)
    record_pip(launch, monkeypatch, [False])
    with pytest.raises(SystemExit, match="Could not install"):
        launch.install_requirements()


def command_line(spec: str) -> list[str]:
    """A value for each flag of a WITHOUT_EFFECT entry, as its metavar asks (two for "X...")."""
    flag, _, metavar = spec.partition(" ")
    return [flag] + (["v1", "v2"] if metavar.endswith("...") else ["v"] if metavar else [])


def test_every_a1111_and_forge_flag_parses_and_warns_once_with_why():
    from webui.cli import WITHOUT_EFFECT, parse_args

    specs = [spec for specs in WITHOUT_EFFECT.values() for spec in specs]
    argv = [arg for spec in specs for arg in command_line(spec)]
    args = parse_args([*argv, "--xformers", "--port", "7999", "--listen"])
    assert args.port == 7999 and args.listen, "the flags after them still parse"
    assert len(args.no_effect) == len(specs), "one line each, --xformers given twice included"
    for spec, line in zip(specs, args.no_effect):
        assert line.startswith(f"{spec.split()[0]} has no effect here: ")
    assert "--xformers has no effect here: attention is PyTorch's scaled-dot-product attention" in args.no_effect[0]
    assert parse_args(["--directml", "--port", "7999"]).port == 7999, "--directml's value is optional"
    assert parse_args([]).no_effect == []


def test_a1111_flags_with_a_meaning_here(tmp_path):
    from webui.cli import parse_args

    assert parse_args(["--precision", "full"]).no_half and not parse_args(["--precision", "autocast"]).no_half
    both = parse_args(["--all-in-fp32"])
    assert both.no_half and both.no_half_vae
    assert parse_args(["--vae-in-fp32"]).no_half_vae and not parse_args(["--vae-in-fp32"]).no_half
    assert parse_args(["--use-cpu", "all"]).device == "cpu" and parse_args(["--always-cpu"]).device == "cpu"
    other = parse_args(["--use-cpu", "interrogate", "esrgan", "--port", "7999"])
    assert other.device == "auto" and other.port == 7999
    assert other.no_effect == ["--use-cpu interrogate esrgan has no effect here: only 'all' and 'sd' mean something "
                               "(--device cpu)"]
    assert parse_args(["--always-low-vram"]).lowvram and parse_args(["--always-high-vram"]).always_gpu
    assert parse_args(["--skip-prepare-environment"]).skip_install
    assert parse_args(["--loglevel", "debug"]).loglevel == "DEBUG"
    args = parse_args(["--theme", "dark", "--server-name", "0.0.0.0", "--ckpt", "x.safetensors", "--autolaunch"])
    assert (args.theme, args.server_name, args.ckpt, args.autolaunch) == ("dark", "0.0.0.0", Path("x.safetensors"), True)
    logins = tmp_path / "logins.txt"
    logins.write_text("alice:one, bob:two\ncarol:th:ree\n")
    args = parse_args(["--gradio-auth", "dave:four", "--gradio-auth-path", str(logins)])
    assert args.gradio_auth == [("dave", "four"), ("alice", "one"), ("bob", "two"), ("carol", "th:ree")]
    assert args.api_auth == args.gradio_auth and args.gradio_auth_path == logins, "the flags keep the path"
    result = run_launch("--skip-venv", "--skip-install", "--gradio-auth-path", str(tmp_path / "missing"))
    assert result.returncode == 2 and "cannot read" in result.stderr
    result = run_launch("--skip-venv", "--skip-install", "--theme", "blue")
    assert result.returncode == 2 and "invalid choice: 'blue'" in result.stderr


def test_a1111_upscaler_folder_flags_put_those_folders_elsewhere(tmp_path):
    from webui.cli import parse_args
    from webui.settings import Paths

    mine = tmp_path / "my-esrgan"
    paths = Paths.from_args(parse_args(["--data-dir", str(tmp_path), "--esrgan-models-path", str(mine),
                                        "--dat-models-path", str(tmp_path / "dat")]))
    models = tmp_path / "models"
    assert paths.upscaler_dirs == (mine, models / "RealESRGAN", models / "SwinIR", tmp_path / "dat", models / "HAT",
                                   models / "upscale_models")
    assert parse_args(["--realesrgan-models-path", "x", "--swinir-models-path", "y"]).no_effect == []


def test_server_name_counts_as_open_to_the_network():
    from webui.cli import parse_args
    from webui.server import bind_address, open_access_warnings

    assert bind_address(parse_args([])) == "127.0.0.1" and bind_address(parse_args(["--listen"])) == "0.0.0.0"
    assert bind_address(parse_args(["--listen", "--server-name", "10.0.0.5"])) == "10.0.0.5", "A1111: it wins"
    assert len(open_access_warnings(parse_args(["--server-name", "10.0.0.5", "--api"]))) == 2
    assert open_access_warnings(parse_args(["--server-name", "localhost", "--api"])) == []


def test_a1111_command_line_on_a_live_server(tmp_path, sd1_file, monkeypatch):
    """--ckpt selects a file outside the model folders, --server-name binds there, --theme, --cors-allow-origins
    and --autolaunch act, and the flags without effect are each named once in the log."""
    browser = tmp_path / "browser"
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {tmp_path / 'opened'}\n")
    browser.chmod(0o755)
    monkeypatch.setenv("BROWSER", str(browser))  # what webbrowser.open runs
    server = start_server(tmp_path, "--api", "--ckpt", str(sd1_file), "--server-name", "127.0.0.2", "--theme", "dark",
                          "--cors-allow-origins", "http://client.example", "--autolaunch", "--xformers",
                          "--enable-insecure-extension-access", "--no-download-sd-model", "--opt-sdp-attention")
    try:
        assert server.url.startswith("http://127.0.0.2:")
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url.replace("127.0.0.2", "127.0.0.1"), timeout=10)
        assert server.api("GET", "options").json()["sd_model_checkpoint"].startswith(sd1_file.name)
        assert sd1_file.name in [m["title"].split(" [")[0] for m in server.api("GET", "sd-models").json()]
        body = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 1}
        assert server.api("POST", "txt2img", json=body).json()["info"].find('"sd_model_name": "sd1-1"') > 0
        page = requests.get(server.url, allow_redirects=False, timeout=30)
        assert page.status_code == 307 and page.headers["location"] == "?__theme=dark"
        assert requests.get(f"{server.url}/?__theme=dark", timeout=30).status_code == 200
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        allowed = requests.options(f"{server.url}/sdapi/v1/txt2img", timeout=30,
                                   headers={"Origin": "http://client.example", **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://client.example"
        other = requests.options(f"{server.url}/sdapi/v1/txt2img", timeout=30,
                                 headers={"Origin": "http://elsewhere.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        assert (tmp_path / "opened").read_text().strip().startswith("http://127.0.0.2:")
        for flag in ("--xformers", "--enable-insecure-extension-access", "--no-download-sd-model",
                     "--opt-sdp-attention"):
            assert server.log.count(f"{flag} has no effect here: ") == 1
        assert "attention is PyTorch's scaled-dot-product attention (SDPA) already" in server.log
    finally:
        server.stop()


def test_ckpt_in_a_folder_is_not_listed_twice_one_elsewhere_is_kept_and_a_wrong_one_is_warned_about(
        tmp_path, sd1_file, sd1_folder, caplog):
    from tests.conftest import make_engine
    from webui.server import checkpoint_choice

    engine = make_engine(tmp_path, sd1_file)
    listed = engine.models.checkpoints()
    inside = checkpoint_choice(engine, tmp_path / "models" / "Stable-diffusion" / sd1_file.name)
    assert inside == {"sd_model_checkpoint": engine.models.title(listed[0])} and engine.models.checkpoints() == listed
    elsewhere = checkpoint_choice(engine, sd1_folder)
    engine.models.refresh()
    assert engine.models.checkpoints() == [engine.models.checkpoints()[0], *listed]
    assert engine.models.checkpoints()[0].path == sd1_folder.resolve()
    config = tmp_path / "config.json"
    with engine.options.overridden(elsewhere):
        assert engine.checkpoint(None).path == sd1_folder.resolve()
    assert not config.exists() or sd1_folder.name not in config.read_text(), "not saved by itself"
    assert checkpoint_choice(engine, tmp_path / "missing.safetensors") == {}
    assert checkpoint_choice(engine, tmp_path / "config.json") == {}
    assert caplog.text.count("is not a checkpoint") == 2


@pytest.mark.parametrize("flags,answered", [
    ([], {"localhost", "127.0.0.1", "::1"}),
    (["--server-name", "127.0.0.2"], {"localhost", "127.0.0.1", "::1", "127.0.0.2"}),
    (["--allowed-hosts", "Studio.lan, box"], {"localhost", "127.0.0.1", "::1", "studio.lan", "box"}),
    (["--listen"], None),  # reachable from elsewhere under names it cannot know: any, unless told
    (["--listen", "--allowed-hosts", "studio.lan"], {"studio.lan", "0.0.0.0"}),
    (["--share"], None),
])
def test_the_host_names_the_server_answers_to(flags, answered):
    from webui.cli import parse_args
    from webui.server import answered_hosts, host_name

    assert answered_hosts(parse_args(flags)) == answered
    assert [host_name(h) for h in ("LocalHost:7860", "[::1]:7860", "127.0.0.1", "::1")] == \
        ["localhost", "::1", "127.0.0.1", "::1"]
