"""tests/conftest.py's seed report: in a failure's report, not printed for skips or passes."""
import shutil
import subprocess
import sys
from pathlib import Path

CASES = '''
import pytest


def test_passes():
    pass


def test_skips():
    pytest.skip("not here")


def test_fails():
    assert False
'''


def test_seed_reported_for_failures_only(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert "1 failed, 1 passed, 1 skipped" in out, out
    assert out.count("torch seed = ") == 1, out
    failure = out[out.index("test_fails"):]
    assert "torch seed = " in failure.split("short test summary")[0], out
