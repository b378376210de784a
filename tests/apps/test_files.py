"""The files the applications write atomically get the mode open() would give them: 0666 less
the umask (issue 25: run files were 0600 while the pages beside them were 0644)."""

from __future__ import annotations

import os

import pytest

from snca_ext.apps.files import write_text_atomic


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "summary.json", "{}")
        (tmp_path / "page.html").write_text("")  # written as the pages are
    finally:
        os.umask(previous)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "page.html").stat().st_mode & 0o777 == mode
