"""Builds run as separate processes that a test kills: slowing their samples down, finding their leftovers.

`slow_samples_pythonpath(folder)` writes a `sitecustomize.py` that, in every Python process started
with it on PYTHONPATH and SGDATA_TEST_SAMPLE_DELAY set, sleeps that many seconds before each sample,
so a kill can land in the middle of a build. `session_processes(sid)` lists the live processes of a
session (a build started with `start_new_session=True`, Ray's workers included), read from /proc.
"""

from __future__ import annotations

import os
from pathlib import Path

SLOW_SAMPLES = '''
import os, time
if os.environ.get("SGDATA_TEST_SAMPLE_DELAY"):
    import sgdata.samples as _samples
    _make_sample, _delay = _samples.make_sample, float(os.environ["SGDATA_TEST_SAMPLE_DELAY"])

    def _slow_make_sample(kind, spec, options):
        time.sleep(_delay)
        return _make_sample(kind, spec, options)

    _samples.make_sample = _slow_make_sample
'''


def slow_samples_pythonpath(folder: Path, pythonpath: str = "") -> str:
    """Write the slowing hook into `folder` (created) and return `pythonpath` with `folder` in front."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SLOW_SAMPLES)
    return os.pathsep.join([str(folder), pythonpath]).rstrip(os.pathsep)


def session_processes(sid: int) -> list[int]:
    """The pids of the live (not zombie) processes whose session id is `sid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry))
    return found
