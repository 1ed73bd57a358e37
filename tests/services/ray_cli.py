"""What the tests that start real Ray nodes or `harpo` subprocesses share: the venv's bin
directory and the environment those processes run in (no inherited ``RAY_ADDRESS*``, the
project's Ray defaults, the venv first on ``PATH``)."""

import os
import sys
from pathlib import Path

from services.cluster import RAY_ENV_DEFAULTS

BIN = Path(sys.executable).parent


def subprocess_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_ENV_DEFAULTS)
    env.update(extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env
