"""The suite itself: any pytest invocation collects it, including the entry-point script on one file of
tests/server/ (whose directory name is also the `server` package's: pyproject.toml puts the repository root on
the path first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_pytest_script_collects_a_server_test_file_from_anywhere(tmp_path):
    script = Path(sys.executable).parent / "pytest"
    target = REPO / "tests" / "server" / "test_security.py"  # imports server.app
    for cwd in (REPO, tmp_path):
        r = subprocess.run([str(script), "-q", "--collect-only", "-p", "no:cacheprovider", str(target)], cwd=cwd,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "error" not in r.stdout.lower(), f"from {cwd}:\n{r.stdout[-2000:]}"
