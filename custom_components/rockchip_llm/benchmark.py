"""On-board benchmark: the same question with and without the system prompt cache."""

from dataclasses import asdict, dataclass
from statistics import mean
from typing import Any

from .engine import Engine, Generation, LoadedModel, call, perf_or_zero
from .prompt_cache import CacheEntry
from .rkllm.runtime import RunRequest
from .run_planner import SystemPrefix


@dataclass(frozen=True, slots=True)
class BenchmarkRun:
    """The runtime's own measurements of one run."""

    ttft_ms: float
    prefill_tokens: int
    prefill_ms: float
    generate_tokens: int
    decode_tokens_per_s: float
    memory_mb: float


async def _async_measure(
    loaded: LoadedModel, question: str, max_new_tokens: int
) -> BenchmarkRun:
    await call(loaded.model.clear_kv_cache(keep_system_prompt=False))
    generation = Generation(
        loaded, RunRequest(prompt=question, max_new_tokens=max_new_tokens)
    )
    result = await generation.collect()
    perf = perf_or_zero(result.perf)
    return BenchmarkRun(
        ttft_ms=round(generation.ttft_ms or 0.0, 1),
        prefill_tokens=perf.prefill_tokens,
        prefill_ms=round(perf.prefill_time_ms, 1),
        generate_tokens=perf.generate_tokens,
        decode_tokens_per_s=round(
            perf.generate_tokens * 1000 / perf.generate_time_ms, 2
        )
        if perf.generate_time_ms > 0
        else 0.0,
        memory_mb=round(perf.memory_usage_mb, 1),
    )


def _summary(runs: list[BenchmarkRun]) -> dict[str, Any]:
    return {
        "ttft_ms": round(mean(run.ttft_ms for run in runs), 1),
        "prefill_tokens": round(mean(run.prefill_tokens for run in runs), 1),
        "prefill_ms": round(mean(run.prefill_ms for run in runs), 1),
        "decode_tokens_per_s": round(mean(run.decode_tokens_per_s for run in runs), 2),
        "memory_mb": max(run.memory_mb for run in runs),
        "runs": [asdict(run) for run in runs],
    }


async def async_benchmark(
    engine: Engine,
    loaded: LoadedModel,
    prefix: SystemPrefix,
    cache: CacheEntry,
    *,
    question: str,
    runs: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Measure cold (no prompt cache, empty KV) against cached runs; the caller holds the model (Engine.async_hold)."""
    await engine.async_set_prefix(loaded, prefix)
    cold: list[BenchmarkRun] = []
    cached: list[BenchmarkRun] = []
    try:
        for _run in range(runs):
            await engine.async_use_cache(loaded, None)
            cold.append(await _async_measure(loaded, question, max_new_tokens))
            await engine.async_use_cache(loaded, cache)
            cached.append(await _async_measure(loaded, question, max_new_tokens))
    finally:
        await engine.async_use_cache(loaded, cache)
        await engine.async_reset_kv(loaded)
    return {
        "model": loaded.name,
        "runtime_version": engine.library.info.version,
        "simulated": engine.simulated,
        "question": question,
        "system_prompt_tokens": cache.metadata.tokens if cache.metadata else None,
        "cold": _summary(cold),
        "cached": _summary(cached),
    }
