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


@pytest.mark.slow
def test_a_process_that_runs_past_its_time_is_stopped_with_the_stacks_of_its_whole_group():
    from helpers import run

    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
    with pytest.raises(AssertionError, match="ran past 20 s; its stacks") as stopped:
        run([sys.executable, "-c", child + " time.sleep(300)"], timeout=20)
    assert str(stopped.value).count("most recent call first") == 2  # the child's stack too
    assert run([sys.executable, "-c", "print('done')"], timeout=60).stdout == "done\n"  # the control: no stacks
