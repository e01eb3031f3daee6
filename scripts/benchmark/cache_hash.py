"""What checking a prompt cache's content costs: hashing a few hundred MB of .bin.

The host hashes a .bin (SHA-256, hashlib) when it commits it and once per version
of the file before the runtime loads it. A file of the given size, as large as a
real Qwen3-0.6B cache of a long prompt (about 112 KB per token), is hashed from
the page cache, so this is the CPU's share; reading it from an SD card costs what
the runtime's own load costs anyway (and warms the cache for it). BLAKE2b and
SHA-1 are measured beside it for comparison.
"""

import hashlib
from pathlib import Path
import time
from typing import Any

from custom_components.rockchip_llm.host.prompt_cache import CONTENT_HASH

COMPARED = (CONTENT_HASH, "blake2b", "sha1")
REPETITIONS = 3
_CHUNK = 1024 * 1024


def _write(path: Path, megabytes: int) -> None:
    """Write megabytes of incompressible bytes (a KV dump is not zeros)."""
    block = hashlib.shake_256(b"rockchip_llm").digest(_CHUNK)
    with path.open("wb") as file:
        for index in range(megabytes):
            file.write(block[index % 256 :] + block[: index % 256])


def measure_cache_hash(megabytes: int, work_dir: Path) -> dict[str, Any]:
    """Hash a file of megabytes with each hash; return the best MB/s of each."""
    path = work_dir / "cache-hash.bin"
    _write(path, megabytes)
    speeds: dict[str, float] = {}
    try:
        for name in COMPARED:
            best = float("inf")
            for _ in range(REPETITIONS):
                started = time.perf_counter()
                with path.open("rb") as file:
                    hashlib.file_digest(file, name)
                best = min(best, time.perf_counter() - started)
            speeds[name] = round(megabytes / best, 1)
    finally:
        path.unlink()
    return {
        "megabytes": megabytes,
        "hash": CONTENT_HASH,
        "mb_per_s": speeds,
        "ms_for_file": round(megabytes / speeds[CONTENT_HASH] * 1000, 1),
    }


def print_cache_hash(data: dict[str, Any]) -> None:
    """Print the measurement in one line."""
    others = ", ".join(
        f"{name} {speed:g}"
        for name, speed in data["mb_per_s"].items()
        if name != data["hash"]
    )
    print(
        f"\nCache content check: {data['hash']} of {data['megabytes']} MB from the "
        f"page cache, {data['mb_per_s'][data['hash']]:g} MB/s "
        f"({data['ms_for_file']:g} ms; {others} MB/s)"
    )
