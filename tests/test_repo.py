"""The repository stands alone: what its code and docs cite is inside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = []
    for name in out.split():
        p = ROOT / name
        if (
            p.suffix in {".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".toml", ".cfg"}
            or p.name == "Makefile"
        ):
            if p.is_file():
                files.append(p)
    return files


def test_no_citation_outside_the_repository():
    """No file cites the session's `shared/` folder (CALIBRATION.md, DATA.md, ...), which users do
    not have; figures live in docs/CALIBRATION.md and docs/DATA.md."""
    pattern = re.compile(r"(?<![\w/])(\.\./)?shared/[A-Z]\w*\.md")
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in _tracked_text_files()
        if p.name != "test_repo.py"
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "cites a file outside the repository:\n" + "\n".join(hits)


def test_cited_docs_exist():
    """Every `docs/X.md` the code and docs cite is in the repository."""
    cited = {
        m.group(0)
        for p in _tracked_text_files()
        if p.name != "test_repo.py"
        for m in re.finditer(r"docs/[A-Z][A-Za-z_]*\.md", p.read_text(errors="replace"))
    }
    assert "docs/CALIBRATION.md" in cited
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, f"cited but not in the repository: {missing}"


def test_readme_names_every_preset_and_the_stage_folders_the_code_writes():
    """The README's preset list holds every shipped preset, and each `<folder>/<hash>` of its stage
    table is a folder name a stage of the package writes (`run_stage(root, "<folder>", ...)` or `cfg.root / "<folder>"`)."""
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"preset \(`ssae_ray/presets/\*\.yaml`: (.*?)\)", readme, re.S)
    assert listed, "the README's preset list moved: update this test"
    names = set(re.findall(r"`([\w-]+)`", listed[1]))
    shipped = {p.stem for p in (ROOT / "ssae_ray" / "presets").glob("*.yaml")}
    assert shipped <= names, f"presets missing from the README's list: {sorted(shipped - names)}"
    code = "\n".join(p.read_text() for p in (ROOT / "ssae_ray").rglob("*.py"))
    staged = re.findall(r"run_stage\([^,]+,\s*\"(\w+)\"", code)
    written = set(staged) | set(re.findall(r"root / \"(\w+)\"", code))
    table = readme.split("| stage | what | cached under `<workdir>/` |", 1)[1].split("\n\n", 1)[0]
    cited = set(re.findall(r"`(\w+)/<hash>", table))
    assert cited and cited <= written, (
        f"stage folders in the README that no stage writes: {sorted(cited - written)}"
    )
