"""Worker processes started by the CLI on this machine (local mode and `specd up`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

READY_PREFIX = "specd-ready "


def announce_ready(role: str, address: str) -> None:
    """Printed by `specd serve` once the server accepts calls; parents wait for this line."""
    print(f"{READY_PREFIX}{role} {address}", flush=True)


@dataclass
class WorkerProcess:
    role: str
    process: subprocess.Popen
    address: str
    log_path: Path

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn(role: str, options: dict[str, object], timeout: float = 600.0, command: list[str] | None = None) -> WorkerProcess:
    """Start `specd serve ROLE` (or `specd COMMAND...`) with --flag value options; returns once
    it announced that it serves."""
    args = [sys.executable, "-m", "specd.cli", *(command or ["serve", role])]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    log = tempfile.NamedTemporaryFile(prefix=f"specd-{role}-", suffix=".log", delete=False)  # noqa: SIM115 - the worker writes it for its whole life
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(READY_PREFIX):
            address = line.split()[-1]
            return WorkerProcess(role, process, address, Path(log.name))
        if not line and process.poll() is not None:
            break
    process.kill()
    tail = Path(log.name).read_text(errors="replace")[-3000:]
    raise RuntimeError(f"the {role} worker did not start (log {log.name}):\n{tail}")
