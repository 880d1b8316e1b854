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


_KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from ssae_ray import stages

final = Path(sys.argv[1])
if sys.argv[2] == "fallback":  # no atomic exchange: die after the old folder is moved aside
    stages._exchange = lambda a, b: False
    real = os.replace
    def replace(src, dst):
        if Path(dst) == final:
            os._exit(9)
        return real(src, dst)
    os.replace = replace
else:  # exchange: die after the swap, before the old copy is removed
    stages.shutil.rmtree = lambda *a, **k: os._exit(9)
with stages.atomic_dir(final) as d:
    (d / "manifest.json").write_text('{"v": 2}')
"""


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_atomic_dir_never_exposes_a_missing_folder(tmp_path, mode):
    """A process killed in the middle of replacing a finished folder leaves a readable one: the old
    (moved aside, put back on read) or the new (exchanged in one step), never none."""
    import json
    import subprocess
    import sys

    final = tmp_path / "art"
    with atomic_dir(final) as d:
        (d / "manifest.json").write_text('{"v": 1}')
    r = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(final), mode], timeout=60)
    assert r.returncode == 9  # it was killed mid-swap
    m = read_manifest(final)
    assert m is not None, f"{final} missing after a killed swap: {sorted(p.name for p in tmp_path.iterdir())}"
    assert m["v"] == (2 if mode == "exchange" else 1)
    assert json.loads((final / "manifest.json").read_text()) == m
    with atomic_dir(final) as d:  # and the next writer cleans up what the killed one left
        (d / "manifest.json").write_text('{"v": 3}')
    assert read_manifest(final)["v"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("art.tmp-")) == ["art"]
