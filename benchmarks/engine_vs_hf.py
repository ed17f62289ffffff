"""pdserve's engine against HF transformers `generate` on CPU: same process, same model, same
prompts, measurements interleaved so that a noisy shared machine hits both sides alike.

The model is the default one (SmolLM2-135M-Instruct GGUF, dequantized to fp32 by both sides).
Every prompt is chat-templated; every request greedily generates exactly `--max-tokens` tokens
(pdserve: `ignore_eos`; HF: `min_new_tokens == max_new_tokens`). Two workloads:

- batch1:  one request. pdserve `LLMEngine.generate` vs HF `generate` on an unpadded [1, T] input.
- batch16: 16 requests with prompts of different lengths. pdserve: one `generate` call
  (continuous batching over the paged KV cache, no padding). HF: one left-padded batch with an
  attention mask (the standard HF way) and, once, the 16 requests one after another.

Tokens/s counts generated tokens over the wall time of the whole call (prefill included). Each
repeat runs pdserve then HF, or HF then pdserve on odd repeats; ratios are pdserve / HF over the
medians, and the median of the per-repeat ratios.

    .venv/bin/python benchmarks/engine_vs_hf.py [--repeats 5] [--threads 2] [--profile]

Writes benchmarks/results/engine_vs_hf_cpu.json and prints a Markdown table.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: busy-waiting threads starve each other on small shared machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.loader.default_model import default_gguf_path  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

RESULT_PATH = REPO_ROOT / "benchmarks" / "results" / "engine_vs_hf_cpu.json"
QUESTIONS = [
    "What is the capital of France?", "Summarize the text below.", "Write a haiku about it.",
    "List three facts from the text.", "Translate the first sentence into French.",
    "Who would enjoy reading this?", "Explain this to a child.", "Give the text a title.",
    "What is the main argument?", "Find one weakness in the text.", "Rewrite it as a tweet.",
    "Which century is this about?", "Ask one question about it.", "Name the key technologies.",
    "Is the tone optimistic?", "Continue the story in one sentence.",
]
FILLER = (
    "The history of computing is a story of layers. Mechanical calculators gave way to relays, "
    "relays to vacuum tubes, tubes to transistors, and transistors to integrated circuits that "
    "hold billions of switches. Each layer hid the one below it, so that programmers could think "
    "in files, processes and networks rather than voltages. "
)


@dataclass(slots=True)
class Workload:
    """Prompts (token ids) that each generate exactly `max_tokens` tokens."""

    name: str
    prompt_ids: list[list[int]]
    max_tokens: int

    @property
    def num_output_tokens(self) -> int:
        return len(self.prompt_ids) * self.max_tokens


def build_prompts(tokenizer, num_prompts: int, max_context_tokens: int) -> list[list[int]]:
    """Chat-templated prompts whose context (filler text before the question) grows linearly
    from 0 to `max_context_tokens` tokens across the batch."""
    filler_ids = tokenizer.encode(FILLER * (1 + max_context_tokens // 40), add_special_tokens=False)
    prompts = []
    for i in range(num_prompts):
        num_context = max_context_tokens * i // max(1, num_prompts - 1)
        context = tokenizer.decode(filler_ids[:num_context]).strip()
        question = QUESTIONS[i % len(QUESTIONS)]
        content = f"{context}\n\n{question}" if context else question
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": content}]))
    return prompts


# ---- the two sides ------------------------------------------------------------------------------
def run_pdserve(engine: LLMEngine, workload: Workload) -> list[list[int]]:
    params = SamplingParams(max_tokens=workload.max_tokens, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in engine.generate(workload.prompt_ids, params)]


class HFRunner:
    """HF transformers `generate`, greedy, every sequence forced to `max_tokens` new tokens."""

    def __init__(self, model, pad_token_id: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id

    @torch.inference_mode()
    def batched(self, workload: Workload) -> list[list[int]]:
        """All prompts as one left-padded batch with its attention mask."""
        width = max(len(p) for p in workload.prompt_ids)
        input_ids = torch.full((len(workload.prompt_ids), width), self.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(workload.prompt_ids):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        out = self.model.generate(input_ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=workload.max_tokens,
                                  min_new_tokens=workload.max_tokens,
                                  pad_token_id=self.pad_token_id)
        return out[:, width:].tolist()

    def sequential(self, workload: Workload) -> list[list[int]]:
        """The prompts one after another, each an unpadded batch of one."""
        outputs = []
        for prompt in workload.prompt_ids:
            outputs += self.batched(Workload(workload.name, [prompt], workload.max_tokens))
        return outputs


def load_hf_model():
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()


# ---- measuring ----------------------------------------------------------------------------------
def timed(fn: Callable[[], list[list[int]]], num_tokens: int) -> tuple[float, list[list[int]]]:
    """(generated tokens per second, outputs) of one call."""
    start = time.perf_counter()
    outputs = fn()
    elapsed_s = time.perf_counter() - start
    if sum(len(o) for o in outputs) != num_tokens:
        raise RuntimeError(f"expected {num_tokens} generated tokens, got "
                           f"{sum(len(o) for o in outputs)}: a side stopped early")
    return num_tokens / elapsed_s, outputs


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def first_eos(token_ids: list[int], eos_token_ids: tuple[int, ...]) -> int:
    return next((i for i, t in enumerate(token_ids) if t in eos_token_ids), len(token_ids))


def compare(workload: Workload, sides: dict[str, Callable[[], list[list[int]]]], repeats: int,
            eos_token_ids: tuple[int, ...]) -> dict:
    """Interleaved repeats of every side (order reversed on odd repeats) after one warm-up each."""
    names = list(sides)
    first_outputs = {name: sides[name]() for name in names}  # warm-up, kept for the match check
    runs: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            tokens_per_s, _ = timed(sides[name], workload.num_output_tokens)
            runs[name].append(round(tokens_per_s, 2))
            print(f"  {workload.name} rep {rep} {name}: {tokens_per_s:.1f} tok/s", flush=True)
    medians = {name: statistics.median(r) for name, r in runs.items()}
    pd = first_outputs["pdserve"]
    return {
        "num_requests": len(workload.prompt_ids),
        "prompt_lens": [len(p) for p in workload.prompt_ids],
        "max_tokens": workload.max_tokens,
        "tokens_per_s": runs,
        "median_tokens_per_s": {n: round(m, 2) for n, m in medians.items()},
        "ratio_pdserve_over": {n: round(medians["pdserve"] / m, 3)
                               for n, m in medians.items() if n != "pdserve"},
        "median_paired_ratio_pdserve_over": {
            n: round(statistics.median(p / h for p, h in zip(runs["pdserve"], r)), 3)
            for n, r in runs.items() if n != "pdserve"},
        # Per request: how many leading tokens each side shares with pdserve, and where
        # pdserve's first EOS is. HF's min_new_tokens bans EOS while pdserve's ignore_eos samples
        # it, so the outputs may part there; before it, fp32 greedy should agree.
        "common_prefix_with_pdserve": {
            n: [common_prefix(pd_out, out) for pd_out, out in zip(pd, o)]
            for n, o in first_outputs.items() if n != "pdserve"},
        "pdserve_first_eos_index": [first_eos(out, eos_token_ids) for out in pd],
    }


def once(workload: Workload, fn: Callable[[], list[list[int]]]) -> float:
    """Tokens/s of a single timed run (for a side too slow to repeat)."""
    tokens_per_s, _ = timed(fn, workload.num_output_tokens)
    print(f"  {workload.name} once: {tokens_per_s:.1f} tok/s", flush=True)
    return round(tokens_per_s, 2)


def op_times_ms(fn: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """(wall ms, self CPU ms per torch op) of one profiled call."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall_ms = (time.perf_counter() - start) * 1e3
    return wall_ms, {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def profile_side(run: Callable[[Workload], object], workload: Workload, num_steps: int = 16,
                 top: int = 10) -> dict:
    """Where one side's time goes on `workload`: self CPU ms per torch op of the prefill (a run
    that generates one token) and of one decode step (a run that generates 1 + num_steps tokens,
    minus the prefill run, over num_steps). Wall time not covered by torch ops is Python and
    framework overhead ("outside_ops")."""
    prefill_wall, prefill = op_times_ms(lambda: run(replace(workload, max_tokens=1)))
    full_wall, full = op_times_ms(lambda: run(replace(workload, max_tokens=1 + num_steps)))
    step = {op: (ms - prefill.get(op, 0.0)) / num_steps for op, ms in full.items()}
    step_wall = (full_wall - prefill_wall) / num_steps
    return {"prefill": _top_ops(prefill_wall, prefill, top),
            "decode_step": _top_ops(step_wall, step, top)}


def _top_ops(wall_ms: float, ops: dict[str, float], top: int) -> dict:
    ranked = sorted(ops.items(), key=lambda item: item[1], reverse=True)[:top]
    return {"wall_ms": round(wall_ms, 1), "outside_ops_ms": round(wall_ms - sum(ops.values()), 1),
            "top_ops_self_cpu_ms": {op: round(ms, 2) for op, ms in ranked}}


# ---- report -------------------------------------------------------------------------------------
def machine_info(num_threads: int) -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": num_threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_avg_at_start": os.getloadavg()}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def markdown_table(results: dict) -> str:
    rows = ["| workload | side | median tok/s | pdserve / side |", "|---|---|---|---|"]
    for name, res in results["workloads"].items():
        for side, tps in res["median_tokens_per_s"].items():
            ratio = res["ratio_pdserve_over"].get(side)
            shown = "" if ratio is None else f"{ratio:.2f}x"
            rows.append(f"| {name} | {side} | {tps:.1f} | {shown} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side and workload")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--num-requests", type=int, default=16,
                        help="requests of the batch workload")
    parser.add_argument("--max-context-tokens", type=int, default=256,
                        help="filler tokens of the longest batch prompt (the shortest has none)")
    parser.add_argument("--skip-hf-sequential", action="store_true",
                        help="skip the one-off run of the batch's requests one by one in HF")
    parser.add_argument("--profile", action="store_true",
                        help="also break both sides' prefill and decode step down by torch op")
    parser.add_argument("--output", type=Path, default=RESULT_PATH)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.max_tokens < 1 or args.num_requests < 1:
        parser.error("--repeats, --max-tokens and --num-requests must be >= 1")
    return args


def run_all(args: argparse.Namespace, engine: LLMEngine, hf: HFRunner) -> dict:
    tokenizer, eos_ids = engine.tokenizer, engine.tokenizer.eos_token_ids
    batch1 = Workload("batch1", build_prompts(tokenizer, 1, 0), args.max_tokens)
    batch = Workload(f"batch{args.num_requests}",
                     build_prompts(tokenizer, args.num_requests, args.max_context_tokens),
                     args.max_tokens)
    workloads = {
        batch1.name: compare(batch1, {"pdserve": lambda: run_pdserve(engine, batch1),
                                      "hf_generate": lambda: hf.batched(batch1)},
                             args.repeats, eos_ids),
        batch.name: compare(batch, {"pdserve": lambda: run_pdserve(engine, batch),
                                    "hf_generate_padded": lambda: hf.batched(batch)},
                            args.repeats, eos_ids)}
    if not args.skip_hf_sequential:
        res = workloads[batch.name]
        tokens_per_s = once(batch, lambda: hf.sequential(batch))
        res["median_tokens_per_s"]["hf_sequential_once"] = tokens_per_s
        res["ratio_pdserve_over"]["hf_sequential_once"] = round(
            res["median_tokens_per_s"]["pdserve"] / tokens_per_s, 3)
    results = {"workloads": workloads}
    if args.profile:
        results["profile"] = {w.name: {
            "pdserve": profile_side(lambda wl: run_pdserve(engine, wl), w),
            "hf_generate": profile_side(hf.batched, w)} for w in (batch1, batch)}
        print(json.dumps(results["profile"], indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(model="default", device="cpu", dtype="float32"))
    hf = HFRunner(load_hf_model(), pad_token_id=engine.tokenizer.eos_token_ids[0])
    results = {"benchmark": "engine_vs_hf", "model": "SmolLM2-135M-Instruct Q4_1 GGUF, fp32",
               "machine": machine_info(args.threads), "repeats": args.repeats}
    results |= run_all(args, engine, hf)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
