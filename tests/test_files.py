"""meshlib's one way of writing files (state, certificates, keys): atomic, private when asked, no debris."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshlib.files import write_atomic


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_behind(tmp_path: Path):
    target = tmp_path / "rules.json"
    write_atomic(target, b'{"version": 1}')
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b'{"version": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rules.json"]


def test_a_private_file_is_owner_only_also_over_a_laxer_one(tmp_path: Path):
    key = tmp_path / "key.pem"
    key.write_bytes(b"old")
    os.chmod(key, 0o644)
    write_atomic(key, b"secret", private=True)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() == b"secret"
    public = tmp_path / "cert.pem"
    write_atomic(public, b"cert")
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
