"""The Rust rule pack in rules/: semgrep's own rule tests, plus an independent check of the annotations."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
FIXTURES = RULES / "tests"


def _semgrep() -> str:
    exe = Path(sys.executable).parent / "semgrep"
    found = str(exe) if exe.exists() else shutil.which("semgrep")
    if found is None:
        pytest.skip("semgrep is not installed (pip install -e '.[dev]')")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_semgrep(), *args, "--metrics=off", "--disable-version-check"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )


def test_semgrep_rule_tests_pass() -> None:
    run = _run("--test", "--config", str(RULES), str(FIXTURES))
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "All tests passed" in out, out


def test_findings_match_annotations_exactly() -> None:
    """Run the rules as a scan (as CI on Rust code would) and compare with `// ruleid:` / `// ok:`."""
    fixtures = sorted(FIXTURES.glob("*.rs"))
    assert fixtures
    for rs in fixtures:
        lines = rs.read_text().splitlines()
        expected: set[tuple[str, int]] = set()
        ok: set[tuple[str, int]] = set()
        for i, line in enumerate(lines, 1):
            m = re.search(r"//\s*(ruleid|ok):\s*([\w-]+)", line)
            if m:
                # the annotation applies to the next line that is not a comment
                j = i + 1
                while lines[j - 1].strip().startswith("//"):
                    j += 1
                (expected if m.group(1) == "ruleid" else ok).add((m.group(2), j))
        assert len(expected) >= 6 and len(ok) >= 6
        run = _run("--config", str(RULES), "--json", "--no-git-ignore", str(rs))
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        assert doc["errors"] == []
        got = {(r["check_id"].rsplit(".", 1)[-1], r["start"]["line"]) for r in doc["results"]}
        assert got == expected, f"missing: {expected - got}, unexpected: {got - expected}"
        assert not (got & ok)


def test_every_rule_has_a_positive_fixture() -> None:
    ids = set(
        re.findall(r"^\s*- id:\s*([\w-]+)", (RULES / "rust-lock-guard-scrutinee.yaml").read_text(), re.M)
    )
    text = "\n".join(p.read_text() for p in FIXTURES.glob("*.rs"))
    assert ids == {"rust-if-let-lock-guard", "rust-match-lock-guard", "rust-while-let-lock-guard"}
    for rule in ids:
        assert f"ruleid: {rule}" in text and f"ok: {rule}" in text
