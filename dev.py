#!/usr/bin/env python3
"""Set up .venv (once, or again when pyproject.toml/constraints.txt change) and run a job.

    python3 dev.py demo [fedmaml simulate options]   # the main job: MAML vs FedAvg + fine-tuning
    python3 dev.py test [pytest options]             # ruff, then the whole test suite
    python3 dev.py run COMMAND [ARGS]                # any command inside .venv

Needs nothing but Python >= 3.10 and access to a package index.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".fedmaml-setup"
EXTRAS = "dev,data,plot"
#: the demo: MAML against the FedAvg + fine-tuning baseline on the same clients, short runs;
#: each demo replaces the previous one (runs/demo)
DEMO = ["--compare", "maml", "fedavg", "--rounds", "200", "--overwrite"]


def _fingerprint() -> str:
    h = hashlib.sha256(EXTRAS.encode())
    for name in ("pyproject.toml", "constraints.txt"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def ensure_venv() -> None:
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(
        "installing fedmaml and its dependencies into .venv (first run takes a minute)", flush=True
    )
    subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-c",
            str(ROOT / "constraints.txt"),
            "-e",
            f"{ROOT}[{EXTRAS}]",
        ],
        check=True,
    )
    STAMP.write_text(_fingerprint())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "run"}:
        print(__doc__)
        return 2
    ensure_venv()
    verb, rest = argv[0], argv[1:]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if verb == "demo":
        cmd = [str(BIN / "fedmaml"), "simulate", *DEMO, "--out", str(ROOT / "runs" / "demo"), *rest]
    elif verb == "test":
        lint = subprocess.run([str(BIN / "ruff"), "check", str(ROOT)], env=env)
        if lint.returncode != 0:
            return lint.returncode
        cmd = [str(BIN / "python"), "-m", "pytest", *rest]
    else:
        cmd = rest
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
