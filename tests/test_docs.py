"""The documentation site builds with ``mkdocs build --strict`` (any warning fails: broken links, anchors)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_docs_site_builds_without_warnings(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the docs/dev extras")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    for page in ("index", "quickstart", "reliability", "observability", "config"):
        path = tmp_path / "site" / (page if page != "index" else "") / "index.html"
        assert path.is_file(), path
