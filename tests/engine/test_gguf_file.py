"""engine/loader/gguf_file.py against the gguf package's own reader, hostile headers, and the
on-disk tokenizer cache (engine/loader/tokenizer_cache.py)."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
from gguf import GGUFReader

from engine.loader import default_gguf_path
from engine.loader.gguf_file import read_gguf
from engine.loader.gguf_loader import open_gguf_model
from engine.loader.tokenizer_cache import cache_root, entry_folder, gguf_tokenizer
from tests.engine.factories import default_hf_tokenizer

TEXTS = ["Hello, world!", "<|im_start|>user\nnaïve 你好 🙂<|im_end|>",
         "def f(x):\n    return x"]


@pytest.fixture(scope="module")
def default_file():
    return read_gguf(default_gguf_path())


def test_fields_and_tensors_equal_the_gguf_packages_reader(default_file):
    theirs = GGUFReader(default_gguf_path())
    keys = [key for key in theirs.fields if not key.startswith("GGUF.")]
    assert list(default_file.fields) == keys
    for key in keys:
        ours, reference = default_file.fields[key], theirs.fields[key].contents()
        if isinstance(ours, float):  # stored as float32; struct widens it exactly
            assert np.float32(ours) == np.float32(reference), key
        else:
            assert ours == reference and type(ours) is type(reference), key
    assert len(default_file.tensors) == len(theirs.tensors) == 272
    for ours, reference in zip(default_file.tensors, theirs.tensors, strict=True):
        assert (ours.name, ours.tensor_type) == (reference.name, reference.tensor_type)
        assert ours.shape == tuple(int(dim) for dim in reference.shape)
        assert ours.data.dtype == reference.data.dtype, ours.name
        assert np.array_equal(ours.data, reference.data), ours.name
    assert {tensor.tensor_type.name for tensor in default_file.tensors} >= {"Q4_1", "F32"}


def _header(*, version=3, tensors=0, fields=1, key=b"general.architecture", value=b"llama"):
    body = struct.pack("<4sIQQ", b"GGUF", version, tensors, fields)
    body += struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(value)) + value
    return body


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"GGML" + bytes(20), "GGUF magic"),
    (_header(version=1), "version 1 is not supported"),
    (_header(fields=2**60), "claims 1152921504606846976 items"),
    (_header(tensors=2**40), "claims 1099511627776 items"),
    (_header()[:-3], "header truncated"),
    (_header(value=b"\xff\xfe"), "not UTF-8"),
    (_header()[:-(8 + 4 + 5)] + struct.pack("<IQ", 99, 0), "unknown GGUF value type 99"),
    (_header()[:-(8 + 5)] + struct.pack("<QIQ", 2**62, 4, 0), "header truncated"),
])
def test_hostile_headers_are_value_errors(tmp_path, content, message):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_gguf(path)
    with pytest.raises(ValueError, match="hostile.gguf is not a readable GGUF file"):
        open_gguf_model(path)


def test_a_tensor_past_the_end_of_the_file_is_refused(tmp_path):
    name = b"token_embd.weight"
    info = struct.pack("<Q", len(name)) + name + struct.pack("<IQQIQ", 2, 64, 64, 0, 0)
    path = tmp_path / "short.gguf"
    path.write_bytes(_header(tensors=1) + info + bytes(100))  # 64 x 64 float32 needs 16 kB
    with pytest.raises(ValueError, match="'token_embd.weight' runs past the end"):
        read_gguf(path)


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.setenv("PDSERVE_CACHE_DIR", "off")
    assert cache_root() is None
    monkeypatch.delenv("PDSERVE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "pdserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "pdserve"


def test_a_cached_entry_is_used_and_a_damaged_one_replaced(monkeypatch, tmp_path, default_file):
    """The machine's entry (made by default_hf_tokenizer) is copied into a private cache; a hit
    loads it, a damaged copy is converted again from the file and stored whole."""
    reference = default_hf_tokenizer()
    machine_entry = entry_folder(default_file.metadata_digest)
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    entry = entry_folder(default_file.metadata_digest)
    assert entry.parent == tmp_path / "tokenizers"
    assert default_file.metadata_digest[:32] in entry.name
    if machine_entry is not None and machine_entry.is_dir():
        shutil.copytree(machine_entry, entry)
    hit = gguf_tokenizer(default_file.path, default_file.metadata_digest)  # (or converts, stores)
    assert (entry / "tokenizer.json").is_file()
    (entry / "tokenizer.json").write_text("{ not json")
    repaired = gguf_tokenizer(default_file.path, default_file.metadata_digest)
    assert "not json" not in (entry / "tokenizer.json").read_text()
    for tokenizer in (hit, repaired):
        assert tokenizer.get_vocab() == reference.get_vocab()
        assert [tokenizer.encode(text) for text in TEXTS] == [
            reference.encode(text) for text in TEXTS]
    assert [path.name for path in (tmp_path / "tokenizers").iterdir()] == [entry.name]
    shutil.rmtree(tmp_path / "tokenizers")


def test_an_unwritable_cache_still_gives_the_tokenizer(monkeypatch, tmp_path, default_file):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(blocker))
    tokenizer = gguf_tokenizer(default_file.path, default_file.metadata_digest)
    assert tokenizer.encode(TEXTS[0]) == default_hf_tokenizer().encode(TEXTS[0])


def test_processes_filling_an_empty_cache_at_once_leave_one_whole_entry(monkeypatch, tmp_path,
                                                                        default_file):
    """Two real processes convert the default tokenizer into the same empty cache at the same
    time (as the workers of a starting cluster do): both get it, one entry remains, no
    partial folder is left behind, and the entry loads."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, '.');"
            "from engine.loader import open_model;"
            "print(open_model('default').load_tokenizer().encode('Hello, world!'))")
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    want = str(default_hf_tokenizer().encode("Hello, world!"))
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == want
    entries = sorted(path.name for path in (tmp_path / "tokenizers").iterdir())
    assert entries == [entry_folder(default_file.metadata_digest).name]
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    (tmp_path / "tokenizers" / entries[0] / "chat_template.jinja").write_text("{{ 'mine' }}")
    hit = gguf_tokenizer(default_file.path, default_file.metadata_digest)  # from the entry
    assert hit.encode("Hello, world!") == default_hf_tokenizer().encode("Hello, world!")
    assert hit.chat_template == "{{ 'mine' }}"
