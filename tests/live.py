"""The real launcher in its own process, for tests that drive it from outside (HTTP, the Gradio client, a
browser): ``start_server(data_dir, *flags)`` starts ``launch.py`` on the CPU over its embedded demo model
("demo-shapes", 128x128 native) and returns once it serves."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
PORT_TAKEN = re.compile(r"address already in use|Cannot find empty port", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log_path: Path
    auth: tuple[str, str] | None = None  # what ``api`` sends: the --api-auth the server was started with

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def api(self, method: str, route: str, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.url}/sdapi/v1/{route}", auth=self.auth, timeout=300, **kwargs)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def start_server(data_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Server:
    """``launch.py`` on a free port, on the CPU, over ``data_dir`` (its embedded demo model when it holds none);
    returns once it says where it serves (the UI, the API and the extensions' routes are mounted by then). A port
    another test worker took between the pick and the bind is picked again. ``env``: more environment variables."""
    for _ in range(3):
        server = _start(data_dir, free_port(), flags, env or {})
        if server is not None:
            return server
    pytest.fail("the server found no free port in three tries")


def _start(data_dir: Path, port: int, flags: tuple[str, ...], env: dict[str, str]) -> Server | None:
    log_path = data_dir / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "--skip-venv", "--skip-install", "--port", str(port),
             "--data-dir", str(data_dir), "--device", "cpu", *flags],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    auth = tuple(flags[flags.index("--api-auth") + 1].split(":", 1)) if "--api-auth" in flags else None
    host = flags[flags.index("--server-name") + 1] if "--server-name" in flags else "127.0.0.1"
    server = Server(process, f"http://{host}:{port}", log_path, auth)
    deadline = time.time() + 180
    while not (re.search(r"INFO webui: (Web UI|API only): http", server.log) and answers(server.url)):
        if process.poll() is not None and PORT_TAKEN.search(server.log):
            return None
        if process.poll() is not None or time.time() > deadline:
            server.stop() if process.poll() is None else None
            pytest.fail(f"the server did not start:\n{server.log}")
        time.sleep(0.5)
    return server


@contextmanager
def serving(data_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``start_server`` for a block (a module's fixture): the server is stopped after it, whatever happened."""
    live = start_server(data_dir, *flags, env=env)
    try:
        yield live
    finally:
        live.stop()


def answers(url: str) -> bool:
    try:
        requests.get(url, timeout=5)
        return True
    except requests.RequestException:
        return False
