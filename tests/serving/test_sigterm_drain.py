"""`pdserve serve` drains on SIGTERM (issue 12), checked on a real process.

Each test starts `pdserve serve --device cpu` in a session of its own, with a private Ray
inside it (GCS, raylet, workers), streams through it and sends SIGTERM:

    serving ──SIGTERM──> draining: health NOT_SERVING and new calls UNAVAILABLE at once; calls
    in flight run on for up to supervision.drain_timeout_s, the rest end with UNAVAILABLE
    ──> stopped: exit status 0, the file_sd file lists no target, no process of it is left.

Every process of the deployment is recorded while it runs (`SessionProcesses`), so that a
daemon Ray reparented to init still counts as left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.client import Completion, PdserveClient

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0  # a cluster starts in 30-90 s on a busy 2-core machine
FIRST_TOKEN_TIMEOUT_S = 60.0
HEALTH_FLIP_S = 5.0  # SIGTERM to NOT_SERVING (a loaded 2-core machine)
EXIT_TIMEOUT_S = 60.0  # the drain's end to the exit of the pdserve process
LEFTOVER_TIMEOUT_S = 20.0  # the exit to the end of the last process it started
SERVING_LINE = re.compile(r"^pdserve: serving .* on (\S+) \(")
PROMPT = "Tell me a long story about a lighthouse keeper."
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


# ---- one `pdserve serve` process and everything it starts ----------------------------------------
class SessionProcesses:
    """Every process of the session led by `leader_pid`, recorded while it runs: its session
    members, their descendants, and anything whose command line names its Ray session
    directory (Ray names it session_<date>_<driver pid>)."""

    def __init__(self, leader_pid: int, poll_s: float = 0.5) -> None:
        self.leader_pid = leader_pid
        self._ray_session = re.compile(rf"/session_[0-9_-]+_{leader_pid}(/|\b)")
        self._seen: dict[int, psutil.Process] = {}
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="session-processes", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(self._poll_s)

    def scan(self) -> None:
        for proc in psutil.process_iter(["ppid", "cmdline"]):
            if proc.pid in self._seen or not self._belongs(proc):
                continue
            self._seen[proc.pid] = proc

    def _belongs(self, proc: psutil.Process) -> bool:
        if proc.pid == self.leader_pid or proc.info["ppid"] in self._seen:
            return True
        try:
            if os.getsid(proc.pid) == self.leader_pid:
                return True
        except OSError:
            return False
        return bool(self._ray_session.search(" ".join(proc.info["cmdline"] or ())))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.scan()  # orphans that appeared since the last poll

    def running(self, title_part: str) -> bool:
        """Whether one of them runs now with `title_part` in its command line (process title)."""
        for proc in list(self._seen.values()):
            with _gone_already():
                if title_part in " ".join(proc.cmdline()):
                    return True
        return False

    def listening(self) -> set[tuple[str, int, str]]:
        """(address, port, process name) of every TCP socket its processes listen on now."""
        found = set()
        for proc in self.alive():
            with _gone_already():
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
        return found

    @property
    def num_seen(self) -> int:
        return len(self._seen)

    def alive(self) -> list[psutil.Process]:
        """Those still running (a zombie has exited: it only waits to be reaped)."""
        alive = []
        for proc in self._seen.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        return alive

    def kill_alive(self) -> None:
        for proc in self.alive():
            with _gone_already():
                proc.kill()


def _describe(proc: psutil.Process) -> str:
    with _gone_already():
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    return f"{proc.pid} (gone since)"


@contextmanager
def _gone_already():
    try:
        yield
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass


@dataclass
class ServeProcess:
    """`pdserve serve` running in a session of its own, its output in `log_path`."""

    proc: subprocess.Popen
    log_path: Path
    sd_file: Path
    processes: SessionProcesses
    address: str = ""
    sigterm_at: float = field(default=0.0)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_text()[-num_chars:]

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.address:
            if self.proc.poll() is not None:
                pytest.fail(f"pdserve serve exited with {self.proc.returncode} while starting:\n"
                            f"{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"pdserve serve did not serve within {timeout_s:.0f} s:\n"
                            f"{self.log_tail()}")
            time.sleep(0.5)
            lines = self.log_text().splitlines()
            found = [m.group(1) for m in map(SERVING_LINE.match, lines) if m]
            self.address = found[0] if found else ""

    def wait_for_process(self, title_part: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.processes.running(title_part):
            assert self.proc.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, f"no {title_part!r} process in {timeout_s:g} s"
            time.sleep(0.2)

    def terminate(self) -> None:
        self.sigterm_at = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pdserve serve still runs {timeout_s:.0f} s after the drain:\n"
                        f"{self.log_tail()}")

    def assert_nothing_left(self, timeout_s: float) -> None:
        self.processes.stop()
        deadline = time.monotonic() + timeout_s
        while (left := self.processes.alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, "left behind:\n" + "\n".join(map(_describe, left))


@contextmanager
def pdserve_serve(tmp_path: Path, drain_timeout_s: float, serving: bool = True):
    """Start `pdserve serve --device cpu` (1 prefill + 1 decode instance, one CPU each) and
    yield it, serving unless `serving` is False; whatever still runs at the end is killed."""
    sd_file = tmp_path / "prometheus_sd.json"
    config_path = tmp_path / "pdserve.yaml"
    config_path.write_text(yaml.safe_dump(_config(sd_file, drain_timeout_s)))
    log_path = tmp_path / "pdserve.log"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve", "serve", "--config", str(config_path),
             "--device", "cpu", "--name", f"drain-{os.getpid()}"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    serve = ServeProcess(proc, log_path, sd_file, SessionProcesses(proc.pid))
    try:
        if serving:
            serve.wait_serving(STARTUP_TIMEOUT_S)
        yield serve
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        serve.processes.stop()
        serve.processes.kill_alive()


def _config(sd_file: Path, drain_timeout_s: float) -> dict:
    # grpc_port 0: the OS picks a free port, which the "pdserve: serving ... on" line reports.
    pool = {"num_instances": 1, "cpus_per_instance": 1, "num_kv_blocks": 160,
            "max_num_batched_tokens": 2048}
    return {"model": "default", "device": "cpu", "dtype": "float32", "block_size": 16,
            "prefill": dict(pool), "decode": dict(pool),
            "server": {"grpc_host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0,
                       "worker_metrics_port_base": 0, "prometheus_sd_file": str(sd_file),
                       "max_queued_requests": 16},
            "supervision": {"drain_timeout_s": drain_timeout_s},
            "placement_timeout_s": 60}


# ---- streams and health --------------------------------------------------------------------------
@dataclass
class Stream:
    """One streaming Generate call, read to its end in the background."""

    call: grpc.aio.UnaryStreamCall
    completion: Completion = field(default_factory=Completion)
    first_token: asyncio.Event = field(default_factory=asyncio.Event)
    code: grpc.StatusCode | None = None
    details: str = ""
    ended_at: float = 0.0

    async def read(self) -> None:
        try:
            async for response in self.call:
                self.completion.add(response)
                if self.completion.token_ids:
                    self.first_token.set()
            self.code = await self.call.code()
        except grpc.aio.AioRpcError as error:
            self.code, self.details = error.code(), error.details() or ""
        finally:
            self.ended_at = time.monotonic()
            self.first_token.set()  # a stream that ended early must not be waited for


async def start_streams(client: PdserveClient, num_streams: int,
                        num_tokens: int) -> tuple[list[Stream], list[asyncio.Task]]:
    """`num_streams` greedy calls of exactly `num_tokens` tokens each, once each has a token."""
    streams = [Stream(client.generate_stream(PROMPT, max_tokens=num_tokens, temperature=0.0,
                                             ignore_eos=True, timeout_s=240))
               for _ in range(num_streams)]
    readers = [asyncio.create_task(s.read()) for s in streams]
    await asyncio.wait_for(asyncio.gather(*(s.first_token.wait() for s in streams)),
                           FIRST_TOKEN_TIMEOUT_S)
    for stream in streams:
        assert stream.code is None, f"a stream ended before SIGTERM: {stream.code} {stream.details}"
    return streams, readers


async def health_status(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
    return response.status


async def wait_health(channel: grpc.aio.Channel, want: int, timeout_s: float) -> float:
    """Seconds until health is `want`; fails after `timeout_s`."""
    started = time.monotonic()
    while (status := await health_status(channel)) != want:
        assert time.monotonic() - started < timeout_s, (
            f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)} "
            f"{timeout_s:g} s on")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def assert_refused_while_draining(client: PdserveClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.generate(PROMPT, max_tokens=1, timeout_s=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in (refused.value.details() or ""), refused.value.details()


def assert_targets_listed(sd_file: Path) -> None:
    roles = sorted(group["labels"]["role"] for group in json.loads(sd_file.read_text()))
    assert roles == ["decode", "prefill", "router"]


def assert_no_targets(sd_file: Path) -> None:
    assert json.loads(sd_file.read_text()) == []


# ---- the scenarios -------------------------------------------------------------------------------
NUM_STREAMS = 4
NUM_TOKENS = 96


def test_sigterm_lets_streams_finish_then_exits_cleanly(tmp_path):
    with pdserve_serve(tmp_path, drain_timeout_s=60) as serve:
        assert_targets_listed(serve.sd_file)
        asyncio.run(_streams_finish_after_sigterm(serve))
        drained_at = time.monotonic()
        assert serve.wait_exit(EXIT_TIMEOUT_S) == 0, serve.log_tail()
        exit_s = time.monotonic() - drained_at
        assert_no_targets(serve.sd_file)
        assert "drained (0 requests ended unfinished)" in serve.log_text()
        serve.assert_nothing_left(LEFTOVER_TIMEOUT_S)
        assert serve.processes.num_seen >= 5  # pdserve, GCS, raylet, two actors at least
        print(f"exit {exit_s:.1f} s after the last stream; {serve.processes.num_seen} processes")


async def _streams_finish_after_sigterm(serve: ServeProcess) -> None:
    async with PdserveClient(serve.address) as client, \
            grpc.aio.insecure_channel(serve.address) as channel:
        await wait_health(channel, SERVING, timeout_s=10)
        streams, readers = await start_streams(client, NUM_STREAMS, NUM_TOKENS)
        # `ss -ltn` while serving: pdserve's and its private Ray's listeners, loopback only
        listening = serve.processes.listening()
        assert len(listening) >= 5, listening  # gRPC, /metrics x3, Ray's GCS and raylet...
        assert all(ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")
                   for ip, _, _ in listening), sorted(listening)
        serve.terminate()
        await wait_health(channel, NOT_SERVING, HEALTH_FLIP_S)
        await assert_refused_while_draining(client)
        await asyncio.wait_for(asyncio.gather(*readers), 120)
    for stream in streams:
        assert (stream.code, stream.details) == (grpc.StatusCode.OK, "")
        assert len(stream.completion.token_ids) == NUM_TOKENS
        assert stream.completion.finish_reason == "length"


def test_sigterm_ends_a_stream_that_outlasts_the_drain_with_unavailable(tmp_path):
    drain_timeout_s = 2.0
    with pdserve_serve(tmp_path, drain_timeout_s=drain_timeout_s) as serve:
        stream = asyncio.run(_stream_cut_by_the_drain(serve))
        ended_s = stream.ended_at - serve.sigterm_at
        assert (stream.code, ended_s > drain_timeout_s) == (grpc.StatusCode.UNAVAILABLE, True), (
            stream.details)
        assert ended_s < drain_timeout_s + 10
        assert "shutting down" in stream.details
        assert 0 < len(stream.completion.token_ids) < LONG_NUM_TOKENS
        assert serve.wait_exit(EXIT_TIMEOUT_S) == 0, serve.log_tail()
        assert_no_targets(serve.sd_file)
        assert "drained (1 requests ended unfinished)" in serve.log_text()
        serve.assert_nothing_left(LEFTOVER_TIMEOUT_S)


LONG_NUM_TOKENS = 2000  # far more than a CPU decodes in drain_timeout_s


async def _stream_cut_by_the_drain(serve: ServeProcess) -> Stream:
    async with PdserveClient(serve.address) as client, \
            grpc.aio.insecure_channel(serve.address) as channel:
        (stream,), readers = await start_streams(client, 1, LONG_NUM_TOKENS)
        serve.terminate()
        await wait_health(channel, NOT_SERVING, HEALTH_FLIP_S)
        await asyncio.wait_for(asyncio.gather(*readers), 60)
    return stream


def test_sigterm_while_the_pools_start_stops_cleanly(tmp_path):
    with pdserve_serve(tmp_path, drain_timeout_s=60, serving=False) as serve:
        serve.wait_for_process("Actor.__init__", STARTUP_TIMEOUT_S)  # a model loads
        serve.terminate()
        assert serve.wait_exit(EXIT_TIMEOUT_S) == 0, serve.log_tail()
        assert "pdserve: stopped while starting" in serve.log_text()
        serve.assert_nothing_left(LEFTOVER_TIMEOUT_S)
