"""The Prometheus file_sd file that `pdserve serve` keeps: one target group per `/metrics`.

    [{"targets": ["10.0.0.5:8000"], "labels": {"role": "router", "instance": "router-0"}},
     {"targets": ["10.0.0.7:41233"], "labels": {"role": "prefill", "instance": "prefill-0"}},
     {"targets": ["10.0.0.8:40017"], "labels": {"role": "decode", "instance": "decode-0"}}]

deploy/prometheus.yml reads it through `file_sd_configs`; Prometheus re-reads the file when it
changes. Every write replaces the file atomically (a temporary file in the same folder, then a
rename), so Prometheus never reads half a list. The `instance` label names the pdserve
instance rather than host:port, so a series keeps its name when an instance moves.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROLE_LABEL = "role"
INSTANCE_LABEL = "instance"


@dataclass(frozen=True, slots=True)
class MetricsTarget:
    """One `/metrics` endpoint of the running system."""

    role: str  # "router", "prefill" or "decode"
    instance: str  # "router-0", "prefill-0", ...
    address: str  # host:port Prometheus scrapes


class PrometheusTargetsFile:
    """The file_sd JSON file at `path`; `write` rewrites it only when the targets changed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._written: list[dict] | None = None

    def write(self, targets: list[MetricsTarget]) -> bool:
        """List exactly `targets`; True if the file was (re)written."""
        groups = [{"targets": [t.address],
                   "labels": {ROLE_LABEL: t.role, INSTANCE_LABEL: t.instance}}
                  for t in sorted(targets, key=lambda t: (t.role, t.instance))]
        if groups == self._written:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(groups, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a Prometheus container
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._written = groups
        return True

    def clear(self) -> None:
        """No targets: Prometheus stops scraping this system."""
        self.write([])
