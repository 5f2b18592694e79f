"""Atomic writes: a failed write leaves the previous file as it was and no temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from edgeseg.fileio import atomic_write, write_text


def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path):
    target = write_text(tmp_path / "deep" / "report.md", "first\n")  # creates the folder
    assert target.read_text() == "first\n"

    def half_then_crash(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "first\n" and sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


def test_writers_that_pick_the_format_by_suffix_get_the_target_suffix(tmp_path):
    atomic_write(tmp_path / "a.jpg", Image.new("RGB", (4, 4)).save)
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"


def test_written_files_get_the_usual_permissions(tmp_path):  # as a plain write gives them (umask), not 0600
    write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert (tmp_path / "a.txt").stat().st_mode == (tmp_path / "b.txt").stat().st_mode


def test_a_failed_write_names_the_target_not_the_temporary_file(tmp_path):
    def denied(tmp: str) -> None:
        raise PermissionError(13, "Permission denied", tmp)

    with pytest.raises(PermissionError) as err:
        atomic_write(tmp_path / "model.onnx", denied)
    assert err.value.filename == str(tmp_path / "model.onnx") and list(tmp_path.iterdir()) == []
