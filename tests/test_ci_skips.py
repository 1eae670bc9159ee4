"""tests/conftest.py's skip check, run on a throwaway test file in a fresh pytest: with
GOHGRAPH_CI_NO_SKIPS=1 a skip outside the allow-list fails the session and is named."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
SKIPPING = '''
import pytest

def test_runs():
    assert True

def test_skips():
    pytest.skip("{reason}")
'''
MODULE_SKIP = '''
import pytest

pytest.importorskip("a_module_that_is_not_installed", reason="the optional extra is missing")

def test_never_collected():
    pass
'''


def run_pytest(tmp_path, source, no_skips):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_throwaway.py").write_text(source)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTEST_ADDOPTS", "GOHGRAPH_CI_NO_SKIPS")}
    if no_skips:
        env["GOHGRAPH_CI_NO_SKIPS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


@pytest.mark.parametrize("source", [SKIPPING.format(reason="no browser"), MODULE_SKIP], ids=["test", "module"])
def test_a_skip_outside_the_allow_list_fails_the_ci_session(tmp_path, source):
    done = run_pytest(tmp_path, source, no_skips=True)
    assert done.returncode == 1, done.stdout
    assert "1 skipped, 1 outside the allow-list" in done.stdout, done.stdout
    assert "NOT ALLOWED: test_throwaway.py" in done.stdout, done.stdout


def test_an_allowed_skip_and_a_local_run_pass(tmp_path):
    done = run_pytest(tmp_path, SKIPPING.format(reason="needs CUDA: no GPU here"), no_skips=True)
    assert done.returncode == 0, done.stdout
    assert "1 skipped, 0 outside the allow-list" in done.stdout, done.stdout
    done = run_pytest(tmp_path, SKIPPING.format(reason="no browser"), no_skips=False)
    assert done.returncode == 0 and "SKIPPED" in done.stdout and "allow-list" not in done.stdout, done.stdout
