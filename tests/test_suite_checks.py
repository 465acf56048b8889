"""The suite's own rules, with their controls."""
import multiprocessing
import subprocess
import sys

import pytest

from conftest import InterpreterStarted, InterpreterWatch


def test_an_unmarked_test_that_starts_an_interpreter_fails():
    """The control of conftest's check that keeps `make test-fast` free of process-starting tests (the check
    around this test itself sees nothing: the inner watch refuses first)."""
    with InterpreterWatch("this test") as watch:
        with pytest.raises(InterpreterStarted, match="this test starts"):
            subprocess.run([sys.executable, "-c", "pass"])
        with pytest.raises(InterpreterStarted, match="this test spawns"):
            multiprocessing.get_context("spawn").Process(target=print).start()
        assert subprocess.run(["true"]).returncode == 0  # other programs run
    assert len(watch.seen) == 2
