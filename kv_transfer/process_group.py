"""Standalone two-rank process groups for one prefill/decode pair, and bounded waits on them.

No global `init_process_group`, no world: each pair builds its own backend object straight from
a store (a PrefixStore of the decode instance's rendezvous TCPStore), so pairs come and go
without touching one another. Gloo carries CPU tensors; NCCL carries CUDA tensors when both ends
are on CUDA. A Gloo wait takes a timeout itself (and on expiry closes the TCP pair, which the
peer sees at once); an NCCL wait is a host-side poll of the work until a deadline, after which
the caller aborts the group. NCCL does not tell a rank that its peer aborted: that rank fails
at its own deadline. NCCL also needs CUDA_MODULE_LOADING=EAGER (see ChannelConfig).
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend, Store, Work

from engine.parallel import new_gloo_group
from kv_transfer.errors import KVTransferConnectionError, KVTransferError, KVTransferTimeoutError

PAIR_SIZE = 2
_TIMEOUT_PATTERN = re.compile(r"timed? ?out", re.IGNORECASE)
_NCCL_POLL_MAX_S = 0.002
NCCL_WATCHDOG_TIMEOUT_S = 600.0


def backend_name(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def new_pair_group(
    store: Store, rank: int, device: torch.device, timeout_s: float, bind_host: str | None
) -> Backend:
    """Build the pair's backend; blocks until the peer builds its side or `timeout_s` passes."""
    if rank not in (0, 1):
        raise ValueError(f"a pair has ranks 0 and 1, got rank {rank}")
    try:
        if device.type == "cuda":
            return _new_nccl_group(store, rank, timeout_s)
        return new_gloo_group(store, rank, PAIR_SIZE, timeout_s, bind_host)
    except RuntimeError as exc:
        raise as_transfer_error(exc, f"building the {backend_name(device)} pair group") from exc


def _new_nccl_group(store: Store, rank: int, timeout_s: float) -> Backend:
    if not dist.is_nccl_available():
        raise ValueError("the pair's device is CUDA but this torch build has no NCCL")
    from torch.distributed import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    # Our own deadlines abort a stuck transfer first; NCCL's watchdog is only the backstop.
    options._timeout = timedelta(seconds=max(timeout_s, NCCL_WATCHDOG_TIMEOUT_S))
    return ProcessGroupNCCL(store, rank, PAIR_SIZE, options)


def wait_work(work: Work, timeout_s: float, device: torch.device, what: str) -> None:
    """Wait for `work` at most `timeout_s`; raise a KVTransferError subclass on failure."""
    timeout_s = max(timeout_s, 0.001)
    try:
        if device.type == "cuda":
            _poll_until_complete(work, timeout_s, what)
            work.wait()  # done: this only orders the current stream after the NCCL stream
        else:
            work.wait(timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise as_transfer_error(exc, what) from exc


def _poll_until_complete(work: Work, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    pause_s = 0.0001
    while not work.is_completed():
        if time.monotonic() >= deadline:
            raise KVTransferTimeoutError(f"{what}: no completion within {timeout_s:.3f}s")
        time.sleep(pause_s)
        pause_s = min(pause_s * 2, _NCCL_POLL_MAX_S)


def as_transfer_error(exc: RuntimeError, what: str) -> KVTransferError:
    """Classify a torch.distributed failure as a timeout or a lost connection."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _TIMEOUT_PATTERN.search(message):
        return KVTransferTimeoutError(f"{what}: {message}")
    return KVTransferConnectionError(f"{what}: {message}")
