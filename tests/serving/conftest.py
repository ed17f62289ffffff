"""The local Ray node that the cluster tests share (tests/serving/disagg_cluster.py) stops with
the session."""

from __future__ import annotations

import sys


def pytest_sessionfinish(session, exitstatus):
    module = sys.modules.get("tests.serving.disagg_cluster")
    if module is not None:
        module.stop_shared_ray()
