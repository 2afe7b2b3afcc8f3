"""The package's one way to write and read files (ssl_bocb.files)."""
import json
import math
import os

import pytest

from ssl_bocb.errors import UserError
from ssl_bocb.files import atomic_path, atomic_write, read_json, read_jsonl, strict, write_json


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "result.json"
    write_json(str(path), {"top1": 1.0})
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as f:
            f.write('{"top1": 2')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"top1": 1.0}
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary file left behind


def test_temporary_names_are_unique_and_hidden_beside_the_target(tmp_path):
    target = str(tmp_path / "sub" / "w.bin")
    with atomic_path(target) as a, atomic_path(target) as b:
        assert a != b and os.path.dirname(a) == os.path.dirname(target)
        assert os.path.basename(a).startswith(".w.bin.") and a.endswith(".tmp")
        open(a, "wb").write(b"a")
        open(b, "wb").write(b"b")
    assert open(target, "rb").read() == b"a"  # the outer block finished last and its file is in place


def test_atomic_write_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(str(tmp_path / "x.json"), {})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "x.json").st_mode & 0o777) == 0o644


def test_strict_replaces_non_finite_floats_both_ways():
    data = {"a": [1.0, math.nan, (math.inf, 2)], "b": -math.inf}
    assert strict(data) == {"a": [1.0, None, [None, 2]], "b": None}
    assert strict(data, "string") == {"a": [1.0, "nan", ["inf", 2]], "b": "-inf"}


def test_write_json_is_strict_and_read_json_rejects_non_standard_constants(tmp_path):
    p = tmp_path / "s.json"
    write_json(str(p), {"loss": math.nan})
    assert "NaN" not in p.read_text() and read_json(str(p)) == {"loss": "nan"}
    p.write_text('{"loss": NaN}')
    with pytest.raises(UserError, match="summary .*not readable JSON.*NaN"):
        read_json(str(p), "summary")
    with pytest.raises(UserError, match=r"checkpoint meta '.*missing.json' does not exist; resume from another"):
        read_json(str(tmp_path / "missing.json"), "checkpoint meta", fix="resume from another")
    p.write_text('{"cut')
    with pytest.raises(UserError, match="not readable JSON"):
        read_json(str(p))


def test_read_jsonl_skips_blank_lines_and_answers_empty_for_no_file(tmp_path):
    p = tmp_path / "log.jsonl"
    assert read_jsonl(str(p)) == []
    p.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert [r["step"] for r in read_jsonl(str(p))] == [1, 2]
