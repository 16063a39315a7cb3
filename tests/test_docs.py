"""Every ```python block of README.md and docs/*.md runs (tiny preset, in a scratch folder).

Each block runs on its own, in a fresh namespace, in a temporary working directory that holds
`face.jpg` (the demo's face photo), so a snippet can open it as a reader would their own. A
snippet that needs real weights guards itself (`if weights.is_dir():`), so what it imports and
builds still runs everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def snippets():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, m in enumerate(FENCE.finditer(path.read_text())):
            line = path.read_text()[: m.start()].count("\n") + 2
            yield pytest.param(m.group(1), id=f"{path.relative_to(ROOT)}:{line}")


def test_there_are_snippets():
    assert len(list(snippets())) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("code", list(snippets()))
def test_snippet_runs(code, request, tmp_path, monkeypatch):
    from pidrt.runtime.demo import sample_face_photo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "face.jpg").write_bytes(sample_face_photo()[0])
    exec(compile(code, request.node.callspec.id, "exec"), {"__name__": "__snippet__"})
