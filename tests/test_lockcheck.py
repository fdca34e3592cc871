"""The static lock check: catches every bad fixture at its marked line, passes the good ones and src/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from verdigris.watchdog.lockcheck import check_paths, check_source, main

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "lockcheck"
BAD = sorted(FIXTURES.glob("bad_*.py"))
GOOD = sorted(FIXTURES.glob("good_*.py"))


def test_fixtures_exist() -> None:
    assert len(BAD) >= 5 and len(GOOD) >= 2


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_fixture_caught_at_marked_lines(path: Path) -> None:
    source = path.read_text()
    expected = {i for i, line in enumerate(source.splitlines(), 1) if line.rstrip().endswith("# EXPECT")}
    assert expected, f"{path.name} marks no line with # EXPECT"
    findings = check_source(source, str(path))
    assert {f.line for f in findings} == expected, "\n".join(map(str, findings))
    for f in findings:
        assert str(f).startswith(f"{path}:{f.line}: ")


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_fixture_passes(path: Path) -> None:
    assert check_source(path.read_text(), str(path)) == []


def test_the_project_is_clean() -> None:
    findings, errors = check_paths([ROOT / "src"])
    assert errors == []
    assert findings == [], "\n".join(map(str, findings))


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(FIXTURES / "good_release_first.py")]) == 0
    assert main([str(FIXTURES)]) == 1
    out = capsys.readouterr().out
    assert "bad_upgrade_via_call.py:14: self._lock: write side taken again via Proxy._learn()" in out
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    assert main([str(broken)]) == 2


def test_cli_as_module() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "verdigris.watchdog.lockcheck", str(ROOT / "src")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_read_twice_and_match_and_try_blocks() -> None:
    src = """
from verdigris.watchdog import RWLock
L = RWLock()

def helper():
    with L.read():
        pass

def f(x):
    with L.read():
        helper()
        match x:
            case 1:
                with L.write():
                    pass
        try:
            pass
        except Exception:
            helper2()

def helper2():
    L.acquire()
"""
    lines = sorted(f.line for f in check_source(src))
    assert lines == [14, 19]
