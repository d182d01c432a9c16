from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_steps import make_plan, register

from quantforge.console import PlainReporter, reasons_text
from quantforge.core.engine import run_plan
from quantforge.core.step import BuildOptions
from quantforge.errors import WorkDirLocked
from quantforge.store import WorkDir


@pytest.fixture
def runs(tmp_path, monkeypatch):
    register()
    path = tmp_path / "runs.log"
    monkeypatch.setenv("ENGINE_TEST_RUNS", str(path))

    def read() -> list[str]:
        return path.read_text().split() if path.exists() else []

    return read


def build(tmp_path, **kw):
    options = BuildOptions(keep_going=kw.pop("keep_going", False), dry_run=kw.pop("dry_run", False))
    return run_plan(make_plan(tmp_path, **kw), WorkDir(tmp_path / "work"), options, PlainReporter())


def statuses(report):
    return {r.label: r.status for r in report.results}


def test_second_build_runs_nothing(tmp_path, runs):
    first = build(tmp_path)
    assert first.ok and sorted(runs()) == ["c0:first", "c0:second", "c1:first", "c1:second"]
    second = build(tmp_path)
    assert second.ok and set(statuses(second).values()) == {"reused"}
    assert len(runs()) == 4  # the spy saw no new execution
    assert second.results[1].data == {"from": 1}  # cached data still reported


def test_param_change_reruns_exactly_the_dependents(tmp_path, runs):
    build(tmp_path)
    report = build(tmp_path, n=2)
    assert len(runs()) == 8
    assert reasons_text(report.results[0].reasons) == "params.n: 1 -> 2"
    assert reasons_text(report.results[1].reasons) == "input a changed"
    out = WorkDir(tmp_path / "work")
    second = report.results[1]
    assert (Path(second.output_dir) / "b.txt").read_text() == "A2B"
    assert out.lookup("test.second", second.key)["data"] == {"from": 2}


def test_failure_stops_the_build_unless_keep_going(tmp_path, runs):
    report = build(tmp_path, fail="c0:first")
    assert statuses(report) == {"c0:first": "failed", "c0:second": "not-run", "c1:first": "not-run",
                                "c1:second": "not-run"}
    assert not report.ok
    assert "first failed on purpose" in Path(report.results[0].log).read_text()

    report = build(tmp_path, fail="c0:first", keep_going=True)
    assert statuses(report) == {"c0:first": "failed", "c0:second": "skipped", "c1:first": "built",
                                "c1:second": "built"}


def test_dry_run_runs_nothing(tmp_path, runs):
    report = build(tmp_path, dry_run=True)
    assert set(statuses(report).values()) == {"would-build"} and runs() == []
    assert reasons_text(report.results[0].reasons) == "never built"


def test_deleted_intermediate_is_not_rebuilt_when_its_dependents_are_cached(tmp_path, runs):
    import shutil

    report = build(tmp_path)
    shutil.rmtree(report.results[0].output_dir)  # e.g. a maintainer reclaiming space from the F16 GGUF
    again = build(tmp_path)
    assert again.ok and len(runs()) == 4
    assert statuses(again)["c0:first"] == "not-needed" and statuses(again)["c0:second"] == "reused"
    # ...but when a dependent must run, the intermediate is rebuilt first
    shutil.rmtree(again.results[1].output_dir)
    third = build(tmp_path)
    assert statuses(third)["c0:first"] == "built" and statuses(third)["c0:second"] == "built"


def test_killed_build_resumes_and_never_exposes_half_written_output(tmp_path, runs):
    child = [sys.executable, str(Path(__file__).parent / "engine_child.py"), str(tmp_path)]
    env = {**os.environ, "ENGINE_TEST_KILL": "c0:second"}
    proc = subprocess.run(child, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr  # SIGKILL in the middle of writing b.txt
    work = WorkDir(tmp_path / "work")
    plan = make_plan(tmp_path)
    a, b = plan.steps[0], plan.steps[1]
    assert work.lookup(a.kind, a.key) is not None
    assert work.lookup(b.kind, b.key) is None and not work.step_dir(b.kind, b.key).exists()
    assert list((tmp_path / "work" / "tmp").iterdir())  # the debris stayed in tmp/, nowhere else

    proc = subprocess.run(child, env={k: v for k, v in env.items() if k != "ENGINE_TEST_KILL"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert runs() == ["c0:first", "c0:second", "c0:second", "c1:first", "c1:second"]  # first was reused
    assert (work.step_dir(b.kind, b.key) / "b.txt").read_text() == "A1B"
    assert list((tmp_path / "work" / "tmp").iterdir()) == []  # the killed run's debris is gone


def test_a_second_build_on_the_same_work_dir_is_refused(tmp_path, runs):
    work = WorkDir(tmp_path / "work")
    with work.locked(), pytest.raises(WorkDirLocked, match=str(os.getpid())):
        run_plan(make_plan(tmp_path), WorkDir(tmp_path / "work"), BuildOptions(), PlainReporter())


def test_two_labels_with_one_key_build_once(tmp_path, runs):
    """Two models with the same source share steps by key: the second label reuses what the first built."""
    from quantforge.config.schema import Targets
    from quantforge.core.plan import Plan, topological
    from quantforge.core.step import Step

    a1 = Step("test.first", "m1:first", {"n": 1, "chain": 0, "fail": False}, model="m1")
    a2 = Step("test.first", "m2:first", {"n": 1, "chain": 0, "fail": False}, model="m2")
    plan = Plan(Targets(tmp_path / "targets.yaml", ()), topological([
        Step("test.second", "m1:second", {}, inputs={"a": a1}, model="m1"),
        Step("test.second", "m2:second", {}, inputs={"a": a2}, model="m2")]))
    report = run_plan(plan, WorkDir(tmp_path / "work"), BuildOptions(), PlainReporter())
    assert report.ok and runs() == ["m1:first", "m1:second"]
    assert statuses(report) == {"m1:first": "built", "m1:second": "built", "m2:first": "reused",
                                "m2:second": "reused"}
