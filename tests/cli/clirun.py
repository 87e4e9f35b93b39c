"""Run blobctl in-process (through the real entry point and error boundary) or as a
real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from cli.main import main

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """In-process, via CliRunner's isolation and blobctl's own ``main``."""
    runner = CliRunner()
    code = 0
    with runner.isolation(env=env) as (out, err, _):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue().decode(), err.getvalue().decode())


def run_proc(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    """A real ``blobctl`` process."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                       env=full_env, timeout=timeout, cwd=ROOT)
    return Result(p.returncode, p.stdout, p.stderr)
