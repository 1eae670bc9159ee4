"""Session hooks. With ``GOHGRAPH_CI_NO_SKIPS=1`` (``.ci/run`` sets it) a test that skips for a reason
outside ``ALLOWED_SKIP_REASONS`` fails the session: CI cannot pass by skipping. Every skip's reason is
printed by ``-ra`` (pytest.ini_options' addopts); this hook adds the count and the ids it refuses."""

import os

import pytest

NO_SKIPS_ENV = "GOHGRAPH_CI_NO_SKIPS"
# reasons, by prefix, that a CI machine may legitimately lack: a test that needs a GPU skips with a
# reason starting "needs CUDA" (CI runs on CPU). An optional extra or a browser is not one of them:
# CI installs the test, viz and hf extras and Debian's chromium.
ALLOWED_SKIP_REASONS = ("needs CUDA",)

_skipped = []  # (node id, reason) of every skipped test of this session


def skip_allowed(reason: str) -> bool:
    return reason.startswith(ALLOWED_SKIP_REASONS)


def _reason(report) -> str:
    # a skip's longrepr is (path, line, "Skipped: <reason>")
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, _reason(report)))


def pytest_collectreport(report):
    if report.skipped:  # a module-level importorskip skips the whole file at collection
        _skipped.append((report.nodeid, _reason(report)))


def _refused():
    return [(nodeid, reason) for nodeid, reason in _skipped if not skip_allowed(reason)]


def pytest_sessionfinish(session, exitstatus):
    passing = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)  # any other status fails already
    if os.environ.get(NO_SKIPS_ENV) == "1" and _refused() and exitstatus in passing:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get(NO_SKIPS_ENV) != "1":
        return
    refused = _refused()
    terminalreporter.section(f"{NO_SKIPS_ENV}=1: skips")
    terminalreporter.write_line(f"{len(_skipped)} skipped, {len(refused)} outside the allow-list "
                                f"{list(ALLOWED_SKIP_REASONS)}")
    for nodeid, reason in refused:
        terminalreporter.write_line(f"NOT ALLOWED: {nodeid}: {reason}")
    if refused:
        terminalreporter.write_line(f"the session fails: unset {NO_SKIPS_ENV} to allow skips locally")


@pytest.fixture
def other_process():
    """A live process that is not this one (its pid holds locks in the tests)."""
    from tests.helpers import live_process

    process = live_process()
    yield process
    process.kill()
    process.wait()
