"""A Prometheus server of the test's own: the Debian package's binary (installed by
`install_prometheus.sh` when missing and we are root), run on temporary files and a free port
from deploy/prometheus.yml with 1 s intervals, and a small client of its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.serving.test_metrics import DEPLOY

INSTALL_SCRIPT = Path(__file__).with_name("install_prometheus.sh")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None and os.geteuid() == 0:
        done = subprocess.run(["sh", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                              timeout=600)
        if done.returncode:
            pytest.fail(f"{INSTALL_SCRIPT.name} failed:\n{done.stdout}{done.stderr}")
        found = shutil.which("prometheus")
    if found is None:
        pytest.skip("no `prometheus` binary, and not root to install it: run "
                    "`sudo make prometheus` (Debian package prometheus)")
    return found


class Prometheus:
    """A Prometheus process of our own and its HTTP API."""

    def __init__(self, binary: str, sd_file: Path, workdir: Path) -> None:
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        (sd,) = config["scrape_configs"][0]["file_sd_configs"]
        sd.update(files=[str(sd_file)], refresh_interval="1s")
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = (workdir / "prometheus.log").open("w")
        self._process = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        self.log_path = workdir / "prometheus.log"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            assert self._process.poll() is None, f"prometheus exited: {self.log_path.read_text()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False
        wait_for(ready, timeout_s, "Prometheus to be ready")

    def api(self, path: str, **params: str):
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def value(self, expr: str) -> float:
        """The single value of `expr` (an aggregation)."""
        (result,) = self.query(expr)
        return float(result["value"][1])

    def stop(self) -> None:
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)
        self._log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
