"""Run a real ``flipvqa serve`` in a subprocess on a free local port (tests, benchmarks, scripts).

    with ServerProcess(["--clip_model", "clip/"], log=Path("serve.log")) as server:
        urllib.request.urlopen(server.url + "/api/health")
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m flipvqa serve FLAGS --port <free>``, its output in ``log``; entering waits until
    ``/api/health`` answers (or fails with the log's tail when the server exits or takes too long)."""

    def __init__(self, flags: Sequence[str] = (), log: Optional[Path] = None, timeout: float = 120,
                 host: str = "127.0.0.1", env: Optional[dict] = None):
        self.flags, self.timeout, self.host = list(flags), timeout, host
        self.log = Path(log) if log is not None else Path(os.devnull)
        self.env = {**os.environ, **(env or {})}
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerProcess":
        self.port = free_port(self.host)
        command = [sys.executable, "-m", "flipvqa", "serve", "--host", self.host, "--port", str(self.port), *self.flags]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flipvqa serve exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.health()
                return self
            except (OSError, ValueError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"flipvqa serve did not answer within {self.timeout:.0f} s:\n{self.log_tail()}")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/api/health", timeout=5) as response:
            return json.loads(response.read())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> Optional[int]:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
