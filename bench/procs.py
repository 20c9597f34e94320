"""The controller daemon as a real process on loopback, for the bench, the demo and
the integration tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
_LISTEN = re.compile(r"listening on [^:]+:(\d+), metrics on http://127\.0\.0\.1:(\d+)/metrics")


class ControllerProcess:
    """``openexample-controller serve`` in a subprocess, its log kept for assertions."""

    def __init__(self, workdir: Path, config: dict, port: int = 0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = {"journal": str(self.workdir / "journal.sqlite3"), **config}
        self.config.setdefault("metrics_port", 0)
        self.config["listen"] = f"127.0.0.1:{port}"
        self.config_path = self.workdir / "controller.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.port = 0
        self.metrics_port = 0
        self.log: list[str] = []
        self.log_path = self.workdir / "controller.log"
        self.proc: subprocess.Popen | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ControllerProcess:
        cmd = [sys.executable, "-m", "controller.cli", "serve", "--config", str(self.config_path)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        ready = threading.Event()
        restart = self.port != 0

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            with self.log_path.open("a" if restart else "w") as log:
                for line in self.proc.stdout:
                    log.write(line)
                    log.flush()
                    self.log.append(line.rstrip())
                    m = _LISTEN.search(line)
                    if m:
                        self.port, self.metrics_port = int(m[1]), int(m[2])
                        ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("controller did not start:\n" + "\n".join(self.log))
        # Restart on the same port after a kill: keep it from now on.
        self.config["listen"] = f"127.0.0.1:{self.port}"
        self.config_path.write_text(yaml.safe_dump(self.config))
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the controller vanishes mid-stream."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM and wait: the clean shutdown path."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """``openexample-controller ARGS --controller ADDRESS`` against this daemon."""
        cmd = [sys.executable, "-m", "controller.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
