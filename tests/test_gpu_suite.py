"""The GPU suite works on its first try on a GPU machine: its rehearsal runs every step here as such a machine is
(the project not installed, FFCV and DALI absent), and H200 figures get an MFU."""
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_suite
from benchmarks.gpu_suite import STEPS
from benchmarks.suite_costs import BUDGET_S, Cost, describe, plan
from ddmim import machine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dry_run_rehearses_every_step(tmp_path):
    out = tmp_path / "suite"
    # the limit only guards against a hang: the rehearsal takes about 2.5 minutes on 2 cores
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["dry_run"] and summary["versions"]["torch"] == torch.__version__
    # imported from the working tree through the suite's links, not from this venv's editable install
    assert Path(summary["imported_from"]["ddmim_kernels"]).name == "ddmim_kernels"
    assert summary["imported_from"]["ddmim"] == str(ROOT / "ddmim")
    steps = {e["name"]: e for e in summary["steps"]}
    assert list(steps) == [s.name for s in STEPS]
    for name, e in steps.items():
        assert e["status"] in ("ok", "not run"), (name, e)
        if e["status"] == "ok":
            assert (out / e["json"]).is_file() and (out / "logs" / f"{name}.log").is_file()
        else:
            assert e["reason"]
    assert steps["e2e-ffcv"]["status"] == "not run" and "FFCV does not import here" in steps["e2e-ffcv"]["reason"]
    assert steps["e2e-dali"]["status"] == "not run" and "DALI" in steps["e2e-dali"]["reason"]
    tests = json.loads((out / "kernel-tests.json").read_text())
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0
    rows = [row for name in ("seed-eager", "seed-compile_fused", "seed-compile")
            for row in json.loads((out / f"{name}.json").read_text())["rows"]]
    assert {r["variant"] for r in rows} == {"eager", "channels_last", "torch_kernels", "timm_attention",
                                            "compile_fused", "compile"}
    for r in rows:
        assert "error" not in r and r["images_per_s"] > 0 and r["flops_per_image"] > 0
        assert r["compile"] == ("on" if r["variant"].startswith("compile") else "off"), r
        assert r["compile"] == "off" or (r["graphs"] == 1 and r["graph_breaks"] == 0)
    e2e = json.loads((out / "e2e-folder.json").read_text())
    assert e2e["end_to_end_images_per_s"] > 0 and 0 <= e2e["loader_stall_share"] < 1
    assert "| seed-eager | ok |" in (out / "summary.md").read_text()


def test_an_h200_gets_the_published_peak_when_lightning_has_none(monkeypatch):
    import lightning_fabric.utilities.throughput as throughput

    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(machine.torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(throughput, "get_available_flops", lambda device, dtype: None)
    assert machine.peak_flops("bf16-mixed") == 989.5e12
    assert machine.peak_flops("32") == 494.7e12
    monkeypatch.setattr(machine.torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert machine.peak_flops("bf16-mixed") is None


@pytest.mark.slow
def test_a_step_cut_by_the_budget_is_not_finished_and_keeps_the_rows_it_wrote(tmp_path):
    """A benchmark writes its JSON row by row; the suite's budget cutting it is not a failure, its own limit is."""
    import os
    import sys
    import time

    from benchmarks import gpu_suite

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    row = {"preset": "tiny", "variant": "eager", "batch": 8, "images_per_s": 5.0, "compile": "off"}
    script = f"import json, sys, time; json.dump({{'rows': [{row!r}]}}, open(sys.argv[1], 'w')); time.sleep(60)"
    step = gpu_suite.Step("seed-eager", lambda s, name: [[sys.executable, "-c", script, str(s.json(name))]],
                          Cost(starts=0, fixed_s=1), 30)
    entries = {}
    for budget in (3, 0):  # 3 s left of the suite's budget; then no budget, so the step's own limit of 3 s cuts it
        mode = {**gpu_suite.MODES[True], "budget": budget, "limit_scale": 1}
        suite = gpu_suite.Suite(out, tmp_path, True, sys.executable, dict(os.environ), dict(os.environ), mode)
        entries[budget] = gpu_suite.run_step(suite, replace(step, limit_s=30 if budget else 3), time.monotonic())
    cut = entries[3]
    assert cut["status"] == "not finished" and cut["json"] == "seed-eager.json" and "5 img/s" in cut["headline"]
    assert entries[0]["status"] == "failed" and "its own limit" in entries[0]["reason"]


def _run_stubbed_suite(tmp_path, monkeypatch, slower: dict[str, float]) -> tuple[int, list[dict]]:
    """gpu_suite.main on a stubbed H100 without FFCV and DALI, on a virtual clock: each step writes its JSON
    at once and takes its modelled time, times `slower[name]`, or is cut where the suite cuts it."""
    clock = {"now": 0.0}

    def run_commands(s, step, timeout):
        s.json(step.name).write_text(json.dumps({"rows": []}))
        needed = step.cost.seconds() * slower.get(step.name, 1.0)
        clock["now"] += min(needed, timeout)
        return ("ok", "") if needed <= timeout else ("timed out", f"stopped after {timeout:.0f} s")

    probed = {"device": "NVIDIA H100 80GB HBM3", "cuda": True, "python": "3.12", "versions": {},
              "imported_from": {}, "ffcv": "ModuleNotFoundError: No module named 'ffcv'",
              "dali": "ModuleNotFoundError: No module named 'nvidia'"}
    monkeypatch.setattr(gpu_suite, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock["now"])}))
    monkeypatch.setattr(gpu_suite, "run_commands", run_commands)
    monkeypatch.setattr(gpu_suite, "probe", lambda s: probed)
    monkeypatch.setattr(gpu_suite, "headline", lambda name, r: "")
    out = tmp_path / f"out-{len(slower)}"
    code = gpu_suite.main([str(out), "--work", str(tmp_path / "work")])
    return code, json.loads((out / "summary.json").read_text())["steps"]


def test_the_scheduler_runs_its_plan_and_returns_the_results_when_the_budget_is_cut(tmp_path, monkeypatch):
    """The real scheduler with stubbed steps whose durations come from the cost model (suite_costs): what it
    runs in 420 s on an H100 without FFCV and DALI is the plan, in the order of value; when a compile takes
    twice its estimate, the budget cuts that step ("not finished", its JSON kept), the exit status stays 0
    and the steps after it are not run, with the reason."""
    expected = plan(STEPS, BUDGET_S, "H100", missing=("ffcv", "dali"))
    print(describe(expected, BUDGET_S, "H100", ("ffcv", "dali")))
    print(describe(plan(STEPS, BUDGET_S, "H200", missing=("ffcv", "dali")), BUDGET_S, "H200", ("ffcv", "dali")))
    names = [r["name"] for r in expected]
    assert names[:4] == ["kernel-tests", "bench-kernels", "bench-attention", "seed-eager"]
    assert names.index("profile") < names.index("seed-compile_fused") < names.index("simmim-mae-best")
    assert all(r["finish_s"] is not None or r["not_run"] in ("no ffcv here", "no dali here")
               for r in expected[:names.index("seed-compile") + 1])
    assert max(r["finish_s"] or 0 for r in expected) <= BUDGET_S

    code, steps = _run_stubbed_suite(tmp_path, monkeypatch, {})
    assert code == 0 and [e["name"] for e in steps] == names
    assert [e["status"] == "ok" for e in steps] == [r["finish_s"] is not None for r in expected]

    code, steps = _run_stubbed_suite(tmp_path, monkeypatch, {"seed-compile": 2.0})
    status = {e["name"]: e for e in steps}
    assert code == 0
    assert status["seed-compile"]["status"] == "not finished" and status["seed-compile"]["json"]
    assert status["seed-compile_fused"]["status"] == "ok"
    after = names[names.index("seed-compile") + 1:]
    assert all(status[n]["status"] == "not run" and "budget" in status[n]["reason"] for n in after)
