"""Where the source tree is, for tests that run its programs or read its files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: The repository root: the directory holding C{sidero/}, C{tests/} and C{deploy/}.
REPO = Path(__file__).resolve().parent.parent
#: Runs the real C{twistd sidero} from this tree (see C{tests/integration/run_sidero.py}).
RUN_SIDERO = REPO / "tests" / "integration" / "run_sidero.py"


def tree_env(**extra: str) -> dict[str, str]:
    """This process's environment with C{PYTHONPATH} set to the tree, so a child Python imports
    this C{sidero} (plus C{extra} variables)."""
    return dict(os.environ, PYTHONPATH=str(REPO), **extra)


def json_log_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects among a log file's lines (C{--log-format json}); others are skipped."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
    return out
