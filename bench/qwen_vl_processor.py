#!/usr/bin/env python
"""Qwen2-VL and Qwen2.5-VL image scans with their real processors, in a venv of their own with torchvision.

Qwen2-VL's and Qwen2.5-VL's processors (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``) hold a video processor
that needs torchvision, and PyPI's torchvision does not import beside the project's torch 2.13.0 CPU
("operator torchvision::nms does not exist"). So the project's ``.venv/`` cannot build them, and the
normal suite skips ``tests/test_qwen_vl_processor.py``. This script, without touching the project's
dependencies:

  1. creates (or reuses) ``.venv-torchvision/`` next to ``.venv/`` (ignored by git: the folder holds its own
     ``.gitignore`` of ``*``) and installs into it torch 2.14.1 and torchvision 0.29.1 (on this machine pip on
     Python 3.11 takes both from local disk: a CUDA build of about 5.5 GB that runs on the CPU), then headmap
     editable with ``constraints.txt`` less its torch pin, and pytest;
  2. runs ``tests/test_qwen_vl_processor.py`` inside that venv (``HF_HUB_OFFLINE=1``): a tiny random Qwen2-VL
     and Qwen2.5-VL saved with processors assembled offline, scanned by ``headmap scan`` on ``shapes``, their
     ``modality_mass`` checked against brute force from eager ``output_attentions``, the report's overlays,
     and ``headmap steer`` with ``pai``.

Idempotent: a stamp records what was installed (the torch and torchvision versions and a hash of
pyproject.toml and constraints.txt); only a change reinstalls. Exit codes: pytest's own; 3 when the venv
cannot be built or torchvision does not import in it (the reason is printed).

    python3 bench/qwen_vl_processor.py                    # set up once (minutes), then the tests
    python3 bench/qwen_vl_processor.py --setup-only       # only build the venv
    python3 bench/qwen_vl_processor.py -- -k qwen2_5 -x   # arguments after -- go to pytest
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-torchvision"
TORCH = "2.14.1"
TORCHVISION = "0.29.1"
TEST = "tests/test_qwen_vl_processor.py"


def say(msg: str) -> None:
    print(f"[qwen_vl_processor] {msg}", file=sys.stderr, flush=True)


def constraints_without_torch(venv: Path) -> Path:
    """constraints.txt less its torch pin (this venv takes torch 2.14.1 for torchvision 0.29.1)."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    kept = [line for line in lines if not line.strip().lower().startswith("torch==")]
    path = venv / "constraints-without-torch.txt"
    path.write_text("\n".join(kept) + "\n")
    return path


def ensure_venv(venv: Path = VENV) -> Path:
    """Create or reuse ``venv`` with torch, torchvision, headmap and pytest; its python. Raises
    ``RuntimeError`` with the reason when a step fails."""
    py = venv / "bin" / "python"
    digest = hashlib.sha256(
        b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "constraints.txt"))
    ).hexdigest()[:16]
    want = {"torch": TORCH, "torchvision": TORCHVISION, "headmap-files": digest}
    stamp = venv / ".headmap-torchvision-setup"
    try:
        if py.exists() and json.loads(stamp.read_text()) == want:
            return py
    except (OSError, ValueError):
        pass

    def pip(*args: str) -> None:
        cmd = [str(py), "-m", "pip", "install", "-q", *args]
        say(" ".join(cmd[2:]))
        got = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if got.returncode != 0:
            tail = "\n".join((got.stderr.strip() or got.stdout.strip() or "(no message)").splitlines()[-5:])
            raise RuntimeError(f"`pip install {' '.join(args)}` failed:\n{tail}")

    if not py.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        say(f"creating {venv} (torch {TORCH} + torchvision {TORCHVISION}: about 5.5 GB, minutes, once)")
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    (venv / ".gitignore").write_text("*\n")  # keep the venv out of git without touching the repo's .gitignore
    pip("--upgrade", "pip")
    # both together: pip must not pick a torchvision built for another torch
    pip(f"torch=={TORCH}", f"torchvision=={TORCHVISION}")
    pip("-c", str(constraints_without_torch(venv)), "-e", str(ROOT), "pytest")
    check = subprocess.run(
        [str(py), "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"torchvision installed but does not import: {last}")
    say(f"torch, torchvision: {check.stdout.strip()}")
    stamp.write_text(json.dumps(want))
    return py


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup-only", action="store_true", help="build .venv-torchvision/ and stop")
    p.add_argument("--venv", type=Path, default=VENV, help="where the venv lives (default: .venv-torchvision/)")
    args = p.parse_args(argv)
    try:
        py = ensure_venv(args.venv.resolve())
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        say(f"cannot build {args.venv}: {exc}")
        return 3
    if args.setup_only:
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    versions = subprocess.run(
        [
            str(py),
            "-c",
            "import torch, torchvision, transformers as t; print(torch.__version__, "
            "torchvision.__version__, t.__version__)",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    say(f"torch torchvision transformers: {versions.stdout.strip() or versions.stderr.strip()}")
    cmd = [str(py), "-m", "pytest", "-q", "-rs", TEST, *extra]
    say(" ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
