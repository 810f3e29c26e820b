from __future__ import annotations

import os

import pytest

from e5v.data.paths import UnsafePathError, safe_join


def test_safe_join(tmp_path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert safe_join(root, "a/x.png") == (root / "a" / "x.png").resolve()
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd", ""):
        with pytest.raises(UnsafePathError):
            safe_join(root, bad, where="file.json row 3")
    os.symlink(tmp_path, root / "link")
    with pytest.raises(UnsafePathError, match="escapes"):
        safe_join(root, "link/x.png")
