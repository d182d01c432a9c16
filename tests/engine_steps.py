"""Step kinds for engine tests: a two-step chain whose runners record each execution in a file."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from quantforge.config.schema import Targets
from quantforge.core import registry
from quantforge.core.plan import Plan, topological
from quantforge.core.step import Step


def _record(ctx, name: str) -> None:
    with open(os.environ["ENGINE_TEST_RUNS"], "a") as f:
        f.write(f"{name}\n")


def first(step, ctx):
    _record(ctx, step.label)
    if step.params.get("fail"):
        raise RuntimeError("first failed on purpose")
    (ctx.out_dir / "a.txt").write_text(f"A{step.params['n']}")
    return {"n": step.params["n"]}


def second(step, ctx):
    _record(ctx, step.label)
    upstream = ctx.inputs["a"]
    (ctx.out_dir / "b.txt").write_text("half-written")
    if os.environ.get("ENGINE_TEST_KILL") == step.label:
        os.kill(os.getpid(), signal.SIGKILL)
    (ctx.out_dir / "b.txt").write_text(upstream.file("a.txt").read_text() + "B")
    return {"from": upstream.data["n"]}


def register() -> None:
    registry.register("test.first", first)
    registry.register("test.second", second)


def make_plan(tmp: Path, n: int = 1, chains: int = 2, fail: str | None = None) -> Plan:
    steps = []
    for c in range(chains):
        a = Step("test.first", f"c{c}:first", {"n": n, "chain": c, "fail": fail == f"c{c}:first"}, model=f"c{c}")
        b = Step("test.second", f"c{c}:second", {}, inputs={"a": a}, model=f"c{c}")
        steps += [a, b]
    return Plan(Targets(tmp / "targets.yaml", ()), topological(steps))
