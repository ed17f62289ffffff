"""The engine API for one instance in this process: an engine core and its executor.

`LLMEngine(config)` loads the model, builds the executor the config asks for (one rank in
process, or a group of rank processes for tensor/pipeline parallelism) and the engine core that drives it (engine/core.py: add requests, step, abort,
stream outputs); `generate` runs prompts to completion for offline use.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine import compile_watch
from engine.builder import LoadedModel, load_model
from engine.config import EngineConfig
from engine.core import EngineCore, resolve_max_model_len
from engine.executor.launchers import RankLauncher
from engine.executor.local import LocalExecutor
from engine.executor.rank_calls import ServiceFactory, layout_name
from engine.executor.rank_group import RankGroupExecutor
from engine.loader.source import open_model
from engine.parallel import check_layout
from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams
from engine.warmup import warm_up


class LLMEngine(EngineCore):
    """An engine core with the executor its config asks for."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None,
                 launcher: RankLauncher | None = None,
                 rank_service: ServiceFactory | None = None) -> None:
        """`launcher` starts ranks 1..N-1 of a multi-rank instance (default: local processes);
        `rank_service` is the per-rank state a worker needs on them (rank_calls.py)."""
        if config.use_warmup and config.device == "cuda":
            # remember the variants the graph captures and the warm-up compile, so that a
            # later compilation is named by what it changes (engine/compile_watch.py)
            compile_watch.WATCH.record()
        if config.parallel.world_size > 1:
            if loaded is not None:
                raise ValueError("a multi-rank engine loads its own slices; pass no model")
            model_config = open_model(config.model).config
            check_layout(config, model_config)  # before any rank process starts
            executor = RankGroupExecutor(config, resolve_max_model_len(config, model_config),
                                         launcher=launcher, service=rank_service)
            super().__init__(config, executor.model_config, executor.tokenizer, executor)
        else:
            loaded = loaded or load_model(config)
            executor = LocalExecutor(config, loaded, resolve_max_model_len(config, loaded.config))
            super().__init__(config, loaded.config, loaded.tokenizer, executor)
        # seconds the start-up warm-up took (engine/warmup.py); 0 when it is off
        with compile_watch.WATCH.paused():  # counted only once the engine is ready
            self.warmup_s = warm_up(self) if config.use_warmup else 0.0
        if config.use_warmup and config.device == "cuda":
            compile_watch.WATCH.arm()  # compilations from now on delay requests: count them

    @property
    def runner(self):
        """The one-rank executor's model runner (tests and benchmarks drive it directly)."""
        return self.executor.runner

    @property
    def rank_caller(self):
        """A multi-rank instance's RankCaller (the services of ranks 1..N-1); None for one."""
        return getattr(self.executor, "ranks", None)

    @property
    def parallel_layout(self) -> str:
        par = self.config.parallel
        return layout_name(par.tensor_parallel_size, par.pipeline_parallel_size)

    @property
    def kv_cache(self):
        """The one-rank executor's KV cache tensor (the KV-transfer links read and write it)."""
        return self.executor.kv_cache

    # ---- offline ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[CompletionOutput]:
        """Run every prompt to completion as one continuously batched workload."""
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        ids = [self.add_request(t, sp) for t, sp in zip(token_lists, params_list)]
        results = {rid: CompletionOutput(rid, toks, [], "", "") for rid, toks in zip(ids, token_lists)}
        while self.has_unfinished():
            for out in self.step():
                res = results[out.request_id]
                res.token_ids += out.new_token_ids
                res.logprobs += out.new_logprobs
                res.text += out.text_delta
                if out.finished:
                    res.finish_reason = out.finish_reason
        return [results[rid] for rid in ids]
