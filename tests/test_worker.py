"""Served workers (toolchains/worker.py): one long-lived process runs a build's short tool calls, each with its own
log and its own peak memory, and a kill fails only the command it was running."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantforge.toolchains.worker import ServedWorker, close_served_workers, run_worker

TESTS = Path(__file__).parent


@pytest.fixture
def served(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the worker runs `python -m served_child`
    yield
    close_served_workers()


def call(tmp_path: Path, name: str, *args: str) -> tuple[dict, str]:
    log = tmp_path / f"{name}.log"
    result = run_worker("served_child", list(args), log, tmp_path / f"{name}.result.json", served=True)
    return result, log.read_text()


def test_one_process_serves_commands_each_with_its_own_log_and_peak(served, tmp_path):
    big, big_log = call(tmp_path, "big", "hold", "first", "--mb", "300")
    small, small_log = call(tmp_path, "small", "hold", "second", "--mb", "10")
    assert big["ok"] and small["ok"]
    assert big["pid"] == small["pid"] == ServedWorker.of("served_child").pid
    # what the command printed, from Python and from "C" (the fd), lands in its own log and nowhere else
    assert "python says first" in big_log and "C says first" in big_log and "second" not in big_log
    assert "python says second" in small_log and "C says second" in small_log and "first" not in small_log
    assert f"served by worker pid {big['pid']}" in small_log
    # the peak is counted per command: the second does not inherit the first's 300 MB
    assert big["peak_rss_bytes"] > 300 << 20
    assert small["peak_rss_bytes"] < big["peak_rss_bytes"] - (200 << 20)


def test_a_killed_worker_fails_that_command_only(served, tmp_path):
    before, _ = call(tmp_path, "before", "hold", "x")
    died, log = call(tmp_path, "die", "die")
    assert died["ok"] is False and died.get("killed") is True
    assert "was killed (SIGKILL: out of memory)" in died["error"] and "exit code -9" in log
    after, _ = call(tmp_path, "after", "hold", "y")
    assert after["ok"] and after["pid"] != before["pid"]  # a fresh worker took over


def test_bad_arguments_are_that_command_s_error(served, tmp_path):
    refused, log = call(tmp_path, "refused", "hold")  # the text argument is missing
    assert refused["ok"] is False and "no result" in refused["error"]
    assert "the following arguments are required: text" in log
    fine, _ = call(tmp_path, "fine", "hold", "z")
    assert fine["ok"]


def test_the_worker_ends_when_closed(served, tmp_path):
    call(tmp_path, "one", "hold", "x")
    worker = ServedWorker.of("served_child")
    close_served_workers()
    assert worker.proc.wait(timeout=10) == 0  # it exits by itself once its stdin is closed
    assert ServedWorker.of("served_child") is not worker  # the next command gets a new one
