"""On-board benchmark: the same question with and without the system prompt cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import mean
from typing import TYPE_CHECKING, Any

from .generation import perf_or_zero
from .host.rkllm.runtime import RunRequest

if TYPE_CHECKING:
    from .held_model import HeldModel
    from .host.prompt_cache import CacheEntry


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
    held: HeldModel, cache: CacheEntry | None, question: str, max_new_tokens: int
) -> BenchmarkRun:
    """Run question once on an empty KV, with cache loaded (None: no cache)."""
    await held.async_use_cache(cache)
    await held.async_reset_kv(keep_system=False)
    generation = held.generation(
        RunRequest(prompt=question, max_new_tokens=max_new_tokens)
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


async def async_measure_cold_and_cached(
    held: HeldModel,
    cache: CacheEntry,
    *,
    question: str,
    runs: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Alternate cold runs (no prompt cache) and runs on cache; summarise each kind.

    The prefix is set on the held model; the caller restores its cache and KV.
    """
    cold: list[BenchmarkRun] = []
    cached: list[BenchmarkRun] = []
    for _run in range(runs):
        cold.append(await _async_measure(held, None, question, max_new_tokens))
        cached.append(await _async_measure(held, cache, question, max_new_tokens))
    return {"question": question, "cold": _summary(cold), "cached": _summary(cached)}
