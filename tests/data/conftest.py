"""Fixtures of the data tests; the fake trees themselves live in data_fakes.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_fakes import make_tree  # noqa: E402,F401  (fixture)
