"""Runs the engine-test plan in a separate process (so a test can SIGKILL it mid-step)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine_steps import make_plan, register

from quantforge.console import PlainReporter
from quantforge.core.engine import run_plan
from quantforge.core.step import BuildOptions
from quantforge.store import WorkDir

register()
tmp = Path(sys.argv[1])
report = run_plan(make_plan(tmp), WorkDir(tmp / "work"), BuildOptions(), PlainReporter())
sys.exit(0 if report.ok else 1)
