import pytest

from ssae_ray.stages import atomic_dir, read_manifest, run_stage, stage_key


def test_run_stage_caches_and_is_atomic(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"n": 1}

    key = stage_key({"a": 1})
    p1 = run_stage(tmp_path, "s", key, build)
    p2 = run_stage(tmp_path, "s", key, build)
    assert p1 == p2 and len(calls) == 1
    assert read_manifest(p1)["n"] == 1 and (p1 / "out.txt").read_text() == "x"

    def broken(d):
        (d / "partial").write_text("y")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "s", stage_key({"a": 2}), broken)
    assert not (tmp_path / "s" / stage_key({"a": 2})).exists()
    assert [p.name for p in (tmp_path / "s").iterdir()] == [key]


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    final = tmp_path / "art"
    with atomic_dir(final) as d:
        (d / "v").write_text("1")
    with pytest.raises(ValueError), atomic_dir(final) as d:
        (d / "v").write_text("2")
        raise ValueError
    assert (final / "v").read_text() == "1"
