"""Shared fixtures: the default model loaded once per session, engine factories, leak checks."""

from __future__ import annotations

import os

# Before torch loads OpenMP: busy-waiting threads starve each other on small shared machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's head waits 30 s for its GCS to come up; on a busy 2-core CI machine that is too short.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

if os.environ.get("TRITON_INTERPRET") == "1":  # kernel tests on the CPU: see the module
    from tests.interpreter_speedup import install as _install_interpreter_speedup

    _install_interpreter_speedup()


@pytest.fixture(scope="session")
def default_loaded():
    """SmolLM2-135M-Instruct from the GGUF, fp32 on CPU, shared by every engine in the session."""
    from engine.builder import load_model
    from engine.config import EngineConfig

    return load_model(EngineConfig(model="default", device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def make_engine(default_loaded):
    """Factory: an engine over the shared default model with its own KV cache and scheduler."""
    from tests.helpers import build_engine

    def factory(loaded=None, **kwargs):
        return build_engine(loaded or default_loaded, **kwargs)

    return factory


@pytest.fixture(scope="session")
def hf_default_model():
    """The HF transformers reference for the default model: the same GGUF, dequantized, fp32."""
    from transformers import AutoModelForCausalLM

    from engine.loader.default_model import default_gguf_path

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 torch_dtype=torch.float32)
    return model.eval()
