"""tuned_gc: the collector tuned inside a block (frozen, higher first threshold), restored after."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import gc
from nem_llm._gc import GC_GEN0_THRESHOLD, tuned_gc
before = gc.get_threshold()
keep = [object() for _ in range(1000)]
with tuned_gc():
    inside = (gc.get_freeze_count() > 0, gc.get_threshold()[0] == max(before[0], GC_GEN0_THRESHOLD))
after = (gc.get_freeze_count() == 0, gc.get_threshold() == before)
print(inside, after)
"""


def test_tuned_gc_freezes_inside_the_block_and_restores_the_collector_after_it() -> None:
    # in a child process: the collector's settings are process-wide
    run = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["(True,", "True)", "(True,", "True)"]
