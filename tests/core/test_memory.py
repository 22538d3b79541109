"""skydiff._memory: the ``skydiff`` command keeps freed memory for reuse (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from skydiff import _memory

PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from skydiff._memory import is_retained, retain_freed_memory

    applied = retain_freed_memory()
    assert is_retained() == applied

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    np.ones((2048, 4096), np.float32)  # the first time, the pages must come in anyway
    before = faults()
    for _ in range(5):  # 5 x 32 MiB allocated, touched and freed again
        np.ones((2048, 4096), np.float32)
    print(int(applied), faults() - before)
""")


def run_probe(**env: str) -> tuple[bool, int]:
    completed = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                               env={**os.environ, **env}, check=True, timeout=120)
    applied, faults = completed.stdout.split()
    return bool(int(applied)), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_arrays_are_reused_without_page_faults() -> None:
    applied, faults = run_probe()
    assert applied
    # 5 x 32 MiB would be >= 5 x 16 huge pages (>= 80 faults, 40960 with 4 KiB pages) if
    # each array were mapped afresh
    assert faults < 40, faults
    default, faults_default = run_probe(**{_memory.OPT_OUT: "0"})
    assert not default
    assert faults_default >= 80, faults_default


def test_the_command_applies_it_and_the_api_does_not() -> None:
    code = textwrap.dedent("""
        import sys
        from skydiff import _memory
        from skydiff.cli import main
        main(["plugins", "--role", "metric"])  # argv given: the API, nothing changes
        before = _memory.is_retained()
        sys.argv = ["skydiff", "plugins", "--role", "metric"]
        main()  # the command
        print(int(before), int(_memory.is_retained()))
    """)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, timeout=120)
    before, after = completed.stdout.split()[-2:]
    assert before == "0"
    assert after == ("1" if sys.platform.startswith("linux") else "0")
