"""Atomic file writes: a crash, a full disk or Ctrl-C never leaves half a checkpoint, image or report behind.

Every file edgeseg writes (checkpoints, Hugging Face folders, ONNX graphs, configs, reports, label maps and
overlays, the generated dataset) goes through :func:`atomic_write`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path`` (atomic on POSIX and Windows
    within one folder); the temporary file is removed if ``write`` fails. The temporary name ends in ``path``'s
    suffix, so writers that choose the format by it (Pillow, matplotlib) write the right one. Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name the writer creates itself, so the file gets the usual permissions (mkstemp's are owner-only).
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename == tmp:  # name the file the user asked for, not the temporary one
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
