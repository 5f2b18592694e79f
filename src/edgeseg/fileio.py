"""Files read and written safely.

Every file edgeseg writes (checkpoints, Hugging Face folders, ONNX graphs, configs, reports, label maps and
overlays, the generated dataset) goes through :func:`atomic_write`: a crash, a full disk or Ctrl-C never leaves half
a file behind. Every weights file it reads goes through :func:`read_weights`: nothing but tensors and plain
containers is unpickled, and a damaged file is one line naming it.
"""

from __future__ import annotations

import os
import pickle
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def walk_files(folder: str | os.PathLike, skip: str | os.PathLike | None = None) -> Iterator[tuple[str, list[str]]]:
    """``(folder path, file names)`` of ``folder`` and every folder below it, through symbolic links to folders.

    Each real folder is read once: a link back up the tree ends there, and where a link and the folder it names are
    both in the tree, the real folder is walked first (so its files keep their own path). ``skip`` and what lies
    below it are left out (e.g. a command's output folder inside its input folder)."""
    seen: set[Path] = set()
    skip = Path(skip).resolve() if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen or (skip is not None and (real == skip or skip in real.parents)):
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort(key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d))
        yield dirpath, filenames


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path`` (atomic on POSIX and Windows
    within one folder); the temporary file is removed if ``write`` fails. The temporary name ends in ``path``'s
    suffix, so writers that choose the format by it (Pillow, matplotlib) write the right one. Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):  # some writers (torch.save) report this as a RuntimeError
        raise PermissionError(13, "Permission denied", str(path))
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}"))
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # the usual permissions, whatever the writer chose (safetensors: 0600)
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


def read_yaml(path: str | os.PathLike, name: str) -> Any:
    """The YAML document at ``path`` (``safe_load``: plain data only), or a one-line error naming ``name`` (how the
    message calls the file) and where the syntax breaks."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not UTF-8 text: pass a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{name} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None


def read_weights(path: str | os.PathLike) -> Any:
    """A ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` file's contents; one-line
    errors for a missing, empty, damaged or foreign file, and for pickled objects other than tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist: check the path")
    if path.is_dir():
        raise ValueError(f"checkpoint '{path}' is a folder without config.json: pass a .pth file or a Hugging Face "
                         "folder")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint '{path}' is empty (0 bytes): download or save it again")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"reading '{path}' needs safetensors: pip install safetensors") from err
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors' own error types; a damaged or truncated file
            raise ValueError(f"checkpoint '{path}' is not a readable safetensors file ({err}): download or save it "
                             f"again") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        if err.filename is not None:  # unreadable (permissions, I/O): the caller names the path and the reason
            raise
        # PyTorch's zip reader fails on some cut points of a truncated file with a bare EINVAL, naming nothing
        raise ValueError(f"checkpoint '{path}' is damaged or truncated ({err.strerror or err}): download or save it "
                         f"again") from err
    except Exception as err:  # pickle errors are long and deep; the user needs the file name and the cause
        if isinstance(err, pickle.UnpicklingError) and "allowed global" in str(err):
            raise ValueError(f"checkpoint '{path}' holds objects other than tensors and plain containers, which "
                             f"edgeseg does not unpickle (weights_only=True): save its state_dict instead") from err
        if "zip archive" in str(err):
            raise ValueError(f"checkpoint '{path}' is damaged or truncated (not a complete zip archive): download or "
                             f"save it again") from err
        raise ValueError(f"checkpoint '{path}' is not a PyTorch checkpoint ({type(err).__name__}): pass a "
                         f".pth/.pt/.safetensors file of weights") from err
