"""amodal3d.atomic: a reader sees the old file or the new one, and a failed write leaves nothing."""

from __future__ import annotations

import json

import pytest

from amodal3d.atomic import replace_atomically, write_json_atomic, write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "results.md"
    write_text_atomic(target, "old\n")

    def half(tmp):
        tmp.write_text("ha")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_atomically(target, half)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.md"]
    write_json_atomic(tmp_path / "x.json", {"b": 1, "a": float("nan")}, durable=True)
    assert list(json.loads((tmp_path / "x.json").read_text())) == ["a", "b"]
