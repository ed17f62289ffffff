"""Disaggregated hand-off on two GPUs: 1 prefill + 1 decode instance over NCCL.

Llama-3-8B-shaped model with random bf16 weights (identical on both GPUs: same seed). The prefill
worker runs in this process on cuda:0, the decode worker in a spawned process on cuda:1 — the
same PrefillWorker / DecodeWorker classes the Ray actors wrap, with their control messages
carried by multiprocessing queues instead of Ray calls. Measured in one run:
  1. outputs: disaggregated greedy tokens equal the colocated engine's on the same weights;
  2. KV transfer of 512 / 2k / 8k-token requests (pack, send, scatter, ack) next to raw NCCL
     send/recv of the same byte count with the same ack round trip, and where the time goes
     (the gather and the scatter timed alone, the wire = raw NCCL, the rest = waits);
  3. time until the decode instance emits token 2, disaggregated vs colocated, at 2k tokens
     (the hand-off's addition to the critical path; the client's first token comes from the
     prefill instance either way).
Writes benchmarks/results/disagg_gpu_<device>.json.   Usage: python benchmarks/disagg_gpu.py
Dry run on CPU (tiny model, Gloo, two processes):
    python benchmarks/disagg_gpu.py --device cpu --tiny [--out-dir DIR]   (JSON in DIR or a temp dir)
"""

from __future__ import annotations

import os

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1", "CUDA_MODULE_LOADING": "EAGER",
                   "TOKENIZERS_PARALLELISM": "false"})

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from tempfile import mkdtemp  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its kernels.py would shadow a package

LLAMA3_8B = dict(architecture="llama", vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                 head_dim=128, max_position_embeddings=8192 + 64, rope_theta=500000.0,
                 name="llama-3-8b-shape-random")
TOKENS = (512, 2048, 8192)
# --device cpu --tiny (or PDSERVE_BENCH_DEVICE=cpu, which the spawned decode process inherits)
# runs the same script with a tiny model over Gloo (a dry run on CPU).
if "--device" in sys.argv[:-1] and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    if "--tiny" not in sys.argv:
        raise SystemExit("--device cpu needs --tiny (the Llama-3-8B shape is for GPUs)")
    os.environ["PDSERVE_BENCH_DEVICE"] = "cpu"
if "--out-dir" in sys.argv[:-1]:  # a dry run's JSON goes there (a temp dir by default)
    os.environ["PDSERVE_BENCH_OUT_DIR"] = sys.argv[sys.argv.index("--out-dir") + 1]
CPU_DRY_RUN = os.environ.get("PDSERVE_BENCH_DEVICE") == "cpu"
if CPU_DRY_RUN:
    LLAMA3_8B = dict(LLAMA3_8B, vocab_size=49152, hidden_size=64, intermediate_size=128,
                     num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
    TOKENS = (64, 256)


def _dev(gpu: int) -> str:
    return "cpu" if CPU_DRY_RUN else f"cuda:{gpu}"


def _sync() -> None:
    if not CPU_DRY_RUN:
        torch.cuda.synchronize()


def make_engine(gpu: int, num_blocks: int, loaded=None):
    from benchmarks.gpu_common import bench_tokenizer
    from engine.builder import LoadedModel, build_model, init_random_weights
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine
    from engine.models.config import ModelConfig

    device = "cpu" if CPU_DRY_RUN else "cuda"
    dtype = torch.float32 if CPU_DRY_RUN else torch.bfloat16
    if not CPU_DRY_RUN:
        torch.cuda.set_device(gpu)
    if loaded is None:
        cfg = ModelConfig(**LLAMA3_8B)
        model = build_model(cfg, dtype, device)
        init_random_weights(model, seed=0)
        loaded = LoadedModel(cfg, model, bench_tokenizer())
    config = EngineConfig(model="default", device=device, dtype=str(dtype).removeprefix("torch."),
                          cache=CacheConfig(block_size=16, num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_batched_tokens=8192 + 64))
    return LLMEngine(config, loaded=loaded)


# ---- decode process ------------------------------------------------------------------------
def decode_main(inbox, outbox) -> None:
    from decode_worker.worker import DecodeWorker
    from kv_transfer import ChannelConfig, KVLayoutSpec, KVReceiver, PairChannel, PairRole, pair_key
    from protos.pdserve.v1 import worker_pb2 as w

    engine = make_engine(1, num_blocks=4096)
    emit = lambda out: outbox.put(("out", time.monotonic(), out.SerializeToString()))  # noqa: E731
    worker = DecodeWorker(engine, "decode-0", emit, host="127.0.0.1", transfer_timeout_s=60)
    outbox.put(("endpoint", 0, worker.endpoint("prefill-0", 0).SerializeToString()))
    worker.accept("prefill-0", 0, "cpu" if CPU_DRY_RUN else "cuda")
    spec = KVLayoutSpec.for_cache(engine.kv_cache, engine.model_config.name)
    raw = PairChannel.connect(worker.store.clone(), ChannelConfig(
        pair_key("raw", "decode-0", 0), PairRole.DECODE, "decode-0", _dev(1)), spec)
    bench = PairChannel.connect(worker.store.clone(), ChannelConfig(
        pair_key("bench", "decode-0", 0), PairRole.DECODE, "decode-0", _dev(1)), spec)
    receiver = KVReceiver(bench)
    outbox.put(("ready", 0, b""))
    while True:
        kind, payload = inbox.get()
        if kind == "reserve":
            reply = worker.reserve(w.ReserveRequest.FromString(payload))
            outbox.put(("reserved", 0, reply.SerializeToString()))
        elif kind == "expect":
            worker.expect_transfer("prefill-0", w.TransferDescriptor.FromString(payload))
        elif kind == "first":
            worker.first_token(w.TokenDelta.FromString(payload))
        elif kind == "raw":
            raw_receiver(raw, *payload)
        elif kind == "bench":
            desc_bytes, blocks = payload
            receiver.receive(w.TransferDescriptor.FromString(desc_bytes), engine.kv_cache, blocks, 60)
        elif kind == "stop":
            worker.stop()
            return


def raw_receiver(channel, num_bytes: int, iters: int) -> None:
    buf = torch.empty(num_bytes, dtype=torch.uint8, device=channel.device)
    ack = torch.zeros(4, dtype=torch.int64, device=channel.device)
    for _ in range(iters):
        channel.wait(channel.recv(buf), 60)
        channel.wait(channel.send(ack), 60)


# ---- prefill process (this one) ------------------------------------------------------------
class Bridge:
    """Prefill-side control plane to the decode process; collects its outputs."""

    def __init__(self, to_decode, from_decode) -> None:
        self.to_decode, self.from_decode = to_decode, from_decode
        self.outputs: dict[str, list] = {}
        self.replies: list = []
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        from protos.pdserve.v1 import worker_pb2 as w

        while True:
            kind, t, payload = self.from_decode.get()
            with self.cond:
                if kind == "out":
                    for d in w.DecodeOutputs.FromString(payload).deltas:
                        self.outputs.setdefault(d.request_id, []).append((t, d))
                else:
                    self.replies.append((kind, payload))
                self.cond.notify_all()

    def reply(self, kind: str, timeout_s: float = 600):
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for i, (k, payload) in enumerate(self.replies):
                    if k == kind:
                        return self.replies.pop(i)[1]
                if not self.cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"no {kind} from the decode process")

    def wait_done(self, rid: str, timeout_s: float = 120):
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not any(d.finish_reason or d.error for _, d in self.outputs.get(rid, [])):
                if not self.cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{rid} did not finish")
            return self.outputs.pop(rid)


def run_request(prefill, bridge, rid: str, prompt: list[int], max_tokens: int):
    """Disaggregated: reserve, prefill, stream; returns (tokens, t_submit, t_first, t_token2)."""
    import queue

    from engine.sampling_params import SamplingParams
    from protos.convert import sampling_to_proto
    from protos.pdserve.v1 import PROTOCOL_VERSION
    from protos.pdserve.v1 import worker_pb2 as w

    sampling = sampling_to_proto(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    bridge.to_decode.put(("reserve", w.ReserveRequest(
        protocol_version=PROTOCOL_VERSION, request_id=rid, num_prompt_tokens=len(prompt),
        prompt_token_ids=prompt, sampling=sampling, seed=0).SerializeToString()))
    reserved = w.ReserveReply.FromString(bridge.reply("reserved"))
    assert reserved.accepted
    results: queue.Queue = queue.Queue()
    t_submit = time.monotonic()
    prefill.submit(w.PrefillTask(protocol_version=PROTOCOL_VERSION, request_id=rid,
                                 prompt_token_ids=prompt, sampling=sampling, seed=0,
                                 decode_instance_id="decode-0",
                                 num_decode_cached_tokens=reserved.num_cached_tokens),
                   results.put)
    first = results.get(timeout=300)
    t_first = time.monotonic()
    deltas = bridge.wait_done(rid)
    tokens = list(first.first_token.token_ids) + [t for _, d in deltas for t in d.token_ids]
    return tokens, t_submit, t_first, deltas[0][0]


def colocated_token2_s(engine, prompt: list[int]) -> float:
    from engine.sampling_params import SamplingParams

    engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    start = time.monotonic()
    n = 0
    while n < 2:
        n += sum(len(o.new_token_ids) for o in engine.step())
    return time.monotonic() - start


def bench_transfer(sender, to_decode, kv_cache, num_tokens: int, lpm: int, iters: int = 5) -> float:
    """Median seconds to hand off an already-computed request's KV (pack, send, scatter, ack)."""
    from kv_transfer import new_descriptor

    num_blocks = -(-num_tokens // 16)
    blocks = list(range(num_blocks))
    num_layers = kv_cache.shape[0]
    times = []
    for i in range(iters + 2):
        desc = new_descriptor(sender_key(sender), sender.next_seq, f"bench-{num_tokens}-{lpm}-{i}",
                              num_tokens, num_blocks, (0, num_layers), lpm)
        to_decode.put(("bench", (desc.SerializeToString(), blocks)))
        _sync()
        start = time.monotonic()
        transfer = sender.begin(desc, kv_cache, blocks)
        sender.send_layers(0, num_layers)
        sender.finish(transfer, 60)
        if i >= 2:
            times.append(time.monotonic() - start)
    return statistics.median(times)


def sender_key(sender) -> str:
    return sender._channel.pair_key


def main() -> None:
    from benchmarks.multigpu_common import pack_unpack_s
    from engine.kernels import dispatch
    from kv_transfer import (ChannelConfig, KVLayoutSpec, KVSender, PairChannel, PairRole,
                             layers_per_message_for, pair_key)
    from prefill_worker.worker import DecodePeer, PrefillWorker
    from protos.pdserve.v1 import worker_pb2 as w

    if os.environ.get("PDSERVE_BENCH_TORCH_ONLY"):
        dispatch.use_triton(False)
    ctx = mp.get_context("spawn")
    to_decode, from_decode = ctx.Queue(), ctx.Queue()
    decode_proc = ctx.Process(target=decode_main, args=(to_decode, from_decode), daemon=True)
    decode_proc.start()
    bridge = Bridge(to_decode, from_decode)
    engine = make_engine(0, num_blocks=4096)
    reference = make_engine(0, num_blocks=1024, loaded=_loaded(engine))
    prefill = PrefillWorker(engine, "prefill-0", layers_per_message=1, transfer_timeout_s=60,
                            host="127.0.0.1")
    endpoint = w.PairEndpoint.FromString(bridge.reply("endpoint"))
    peer = DecodePeer(lambda d: to_decode.put(("expect", d.SerializeToString())),
                      lambda d: to_decode.put(("first", d.SerializeToString())))
    prefill.connect("decode-0", endpoint, peer, "cpu" if CPU_DRY_RUN else "cuda")
    from kv_transfer.rendezvous import join_store

    store = join_store(endpoint.store_host, endpoint.store_port)
    spec = KVLayoutSpec.for_cache(engine.kv_cache, engine.model_config.name)
    raw = PairChannel.connect(store, ChannelConfig(pair_key("raw", "decode-0", 0), PairRole.PREFILL,
                                                   "prefill-0", _dev(0)), spec)
    bench = PairChannel.connect(store.clone(), ChannelConfig(
        pair_key("bench", "decode-0", 0), PairRole.PREFILL, "prefill-0", _dev(0)), spec)
    bench_sender = KVSender(bench)
    bridge.reply("ready")
    out = {"device": "cpu-dry-run" if CPU_DRY_RUN else torch.cuda.get_device_name(0), "torch": torch.__version__,
           "model": LLAMA3_8B, "dtype": "bfloat16", "block_size": 16}
    gen = torch.Generator().manual_seed(0)

    def prompt_of(n: int) -> list[int]:
        return torch.randint(0, 49152, (n,), generator=gen).tolist()

    # 1. outputs equal colocated
    checks = []
    for i, n in enumerate((37, 100) if CPU_DRY_RUN else (37, 512, 2048)):
        prompt = prompt_of(n)
        tokens, *_ = run_request(prefill, bridge, f"eq-{i}", prompt, 16)
        ref = reference.generate([prompt], _greedy(16))[0].token_ids
        checks.append({"prompt_tokens": n, "equal": tokens == ref, "disagg": tokens, "colocated": ref})
    out["outputs_equal"] = all(c["equal"] for c in checks)
    out["output_checks"] = checks
    print("outputs equal:", out["outputs_equal"], flush=True)
    _save(out)

    # 2. hand-off of computed KV vs raw NCCL of the same bytes; prefill with layer-wise sends
    out["transfer"] = []
    for n in TOKENS:
        num_bytes = engine.kv_cache[:, :1].numel() * engine.kv_cache.element_size() * n // 16
        raw_s = _raw_round_trips(raw, to_decode, num_bytes)
        row = {"tokens": n, "kv_bytes": num_bytes, "raw_nccl_s": raw_s,
               "raw_nccl_GBps": num_bytes / raw_s / 1e9}
        grouped = layers_per_message_for(engine.kv_cache.shape[0],
                                         num_bytes // engine.kv_cache.shape[0], 1,
                                         prefill.min_message_bytes)
        row["layers_per_message_default"] = grouped
        for lpm in sorted({1, grouped, 32}):
            s_ = bench_transfer(bench_sender, to_decode, engine.kv_cache, n, lpm)
            row[f"handoff_lpm{lpm}_s"] = s_
            row[f"handoff_lpm{lpm}_GBps"] = num_bytes / s_ / 1e9
            row[f"handoff_lpm{lpm}_fraction_of_raw"] = raw_s / s_
        # where the default hand-off's time goes: the gather and the scatter timed alone, the
        # wire = raw NCCL of the same bytes, the rest = waits (handshake, ack, stream syncs)
        row["pack_s"], row["unpack_s"] = pack_unpack_s(engine.kv_cache, -(-n // 16), _sync)
        row["waits_s"] = row[f"handoff_lpm{grouped}_s"] - row["pack_s"] - raw_s - row["unpack_s"]
        hand = []
        for k in range(3):
            prefill_s = _prefill_only_s(reference, prompt_of(n))
            _, t0, t1, _ = run_request(prefill, bridge, f"bw-{n}-{k}", prompt_of(n), 2)
            hand.append((t1 - t0, prefill_s))
        row["prefill_with_layerwise_send_s"] = statistics.median(h[0] for h in hand)
        row["prefill_alone_s"] = statistics.median(h[1] for h in hand)
        out["transfer"].append(row)
        print(row, flush=True)
        _save(out)
    stats = prefill.stats()
    out["prefill_failed_transfers"] = stats.num_transfers_failed

    # 3. token 2 at the decode instance, disaggregated vs colocated, 2k prompt
    rows = []
    for k in range(3):
        p = prompt_of(TOKENS[1])
        coloc = colocated_token2_s(reference, p)
        _, t0, _, t2 = run_request(prefill, bridge, f"ttft-{k}", p, 2)
        rows.append({"colocated_token2_s": coloc, "disagg_token2_s": t2 - t0})
    med_c = statistics.median(r["colocated_token2_s"] for r in rows)
    med_d = statistics.median(r["disagg_token2_s"] for r in rows)
    out["token2_2k"] = {"runs": rows, "colocated_s": med_c, "disaggregated_s": med_d,
                        "added_fraction": med_d / med_c - 1}
    print(out["token2_2k"], flush=True)
    to_decode.put(("stop", None))
    decode_proc.join(30)
    _save(out)
    print(json.dumps({k: v for k, v in out.items() if k != "output_checks"}, indent=1))
    os._exit(0 if out["outputs_equal"] else 1)  # a suite sees a wrong output as a failure


def _save(out: dict) -> None:
    """Write what is measured so far (each phase adds to it): results/ and $OUT if set."""
    name = out["device"].replace(" ", "_")
    results = Path(__file__).parent / "results"
    if CPU_DRY_RUN:  # never beside the GPU results
        results = Path(os.environ.setdefault("PDSERVE_BENCH_OUT_DIR", mkdtemp()))
        results.mkdir(parents=True, exist_ok=True)
    path = results / f"disagg_gpu_{name}.json"
    path.write_text(json.dumps(out, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(json.dumps(out, indent=2))


def _greedy(n: int):
    from engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _loaded(engine):
    from engine.builder import LoadedModel

    return LoadedModel(engine.model_config, engine.runner.model, engine.tokenizer)


def _prefill_only_s(engine, prompt: list[int]) -> float:
    from engine.sampling_params import SamplingParams

    _sync()
    start = time.monotonic()
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return time.monotonic() - start


def _raw_round_trips(raw, to_decode, num_bytes: int, iters: int = 5) -> float:
    buf = torch.ones(num_bytes, dtype=torch.uint8, device=raw.device)
    ack = torch.zeros(4, dtype=torch.int64, device=raw.device)
    to_decode.put(("raw", (num_bytes, iters + 2)))
    times = []
    for i in range(iters + 2):
        _sync()
        start = time.monotonic()
        raw.wait(raw.send(buf), 60)
        raw.wait(raw.recv(ack), 60)
        _sync()
        if i >= 2:
            times.append(time.monotonic() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
