"""The command line of scripts/bench: read the settings, run, print and write the report."""

import argparse
import asyncio
from collections.abc import Sequence
import ctypes
import json
import logging
from pathlib import Path
import subprocess
import sys
import tempfile

from .cache_hash import measure_cache_hash, print_cache_hash
from .harness import new_hass_event_loop
from .homes import async_prefix_figures, figures_json, print_prefix_table
from .qwen3 import load_qwen3
from .report import print_report, to_json, write_plot
from .run import async_benchmark, async_one_startup
from .scenario import (
    MAX_TURNS,
    QWEN3_06B_KV_BYTES_PER_TOKEN,
    RK3588_DECODE_MS,
    RK3588_PREFILL_MS,
    SIM_DIR,
    SIM_LIBRARIES,
    Settings,
)


def parse_args(argv: Sequence[str] | None) -> Settings:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=(
            "TTFT and prefilled tokens of a voice dialogue through Home Assistant, on "
            "the RKLLM simulator calibrated to RK3588 Qwen3-0.6B, for three history "
            "strategies; plus the integration's overhead per request and per token, "
            "and what the worker process adds to the in-process binding."
        ),
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=10,
        help=f"dialogue turns (1-{MAX_TURNS}, default 10)",
    )
    parser.add_argument(
        "--tool-turn",
        type=int,
        default=3,
        help="turn with the tool call (0: none, default 3)",
    )
    parser.add_argument(
        "--prefill-ms",
        type=float,
        default=RK3588_PREFILL_MS,
        help="simulated ms per prefilled token (default 1.56)",
    )
    parser.add_argument(
        "--decode-ms",
        type=float,
        default=RK3588_DECODE_MS,
        help="simulated ms per decoded token (default 30.4)",
    )
    parser.add_argument(
        "--cache-bytes-per-token",
        type=int,
        default=QWEN3_06B_KV_BYTES_PER_TOKEN,
        help="bytes of prompt-cache file per token (default 114688, Qwen3-0.6B)",
    )
    parser.add_argument(
        "--overhead-requests",
        type=int,
        default=50,
        help="zero-delay requests per reply length (default 50)",
    )
    parser.add_argument(
        "--overhead-reply-tokens",
        type=int,
        default=200,
        help="tokens of the long reply (default 200)",
    )
    parser.add_argument(
        "--overhead-rounds",
        type=int,
        default=5,
        help=(
            "rounds of those requests (default 5): the ratio to HA's rendering is "
            "also given per round, to show how much it varies on this machine"
        ),
    )
    parser.add_argument(
        "--worker-repetitions",
        type=int,
        default=30,
        help="repetitions of the worker against in-process comparison (default 30)",
    )
    parser.add_argument(
        "--worker-reply-tokens",
        type=int,
        default=400,
        help="tokens of the long reply of that comparison (default 400)",
    )
    parser.add_argument(
        "--abi",
        choices=sorted(SIM_LIBRARIES),
        default="1.3",
        help="simulated runtime ABI family",
    )
    parser.add_argument(
        "--hash-mb",
        type=int,
        default=256,
        help="MB of prompt-cache file whose content hash is measured (default 256)",
    )
    parser.add_argument(
        "--json", type=Path, dest="json_path", help="write the results as JSON"
    )
    parser.add_argument(
        "--plot", type=Path, dest="plot_path", help="write a PNG chart (matplotlib)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress and HA warnings"
    )
    parser.add_argument(
        "--startup-only",
        type=Path,
        dest="startup_cache",
        metavar="CACHE_DIR",
        help=(
            "only start Home Assistant once with this cache folder (kept) and print "
            "the start-up measurement as JSON: run it twice to see a restart"
        ),
    )
    args = parser.parse_args(argv)
    if not 1 <= args.turns <= MAX_TURNS:
        parser.error(f"--turns must be between 1 and {MAX_TURNS}")
    if not 0 <= args.tool_turn <= MAX_TURNS:
        parser.error(f"--tool-turn must be between 0 and {MAX_TURNS}")
    if args.prefill_ms < 0 or args.decode_ms < 0:
        parser.error("delays must be >= 0")
    for path in (args.json_path, args.plot_path):
        if path is not None and not path.resolve().parent.is_dir():
            parser.error(f"no such directory: {path.resolve().parent}")
    if args.overhead_requests < 1 or args.overhead_reply_tokens < 10:
        parser.error("--overhead-requests must be >= 1, --overhead-reply-tokens >= 10")
    if args.overhead_rounds < 1:
        parser.error("--overhead-rounds must be >= 1")
    if args.hash_mb < 1:
        parser.error("--hash-mb must be >= 1")
    if args.worker_repetitions < 1 or args.worker_reply_tokens < 10:
        parser.error("--worker-repetitions must be >= 1, --worker-reply-tokens >= 10")
    return Settings(
        turns=args.turns,
        tool_turn=args.tool_turn,
        prefill_ms=args.prefill_ms,
        decode_ms=args.decode_ms,
        cache_bytes_per_token=args.cache_bytes_per_token,
        overhead_requests=args.overhead_requests,
        overhead_reply_tokens=args.overhead_reply_tokens,
        overhead_rounds=args.overhead_rounds,
        worker_repetitions=args.worker_repetitions,
        worker_reply_tokens=args.worker_reply_tokens,
        abi=args.abi,
        json_path=args.json_path,
        plot_path=args.plot_path,
        verbose=args.verbose,
        startup_cache=args.startup_cache,
        cache_hash_mb=args.hash_mb,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark."""
    settings = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if settings.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not settings.verbose:
        # "We found a custom integration ... not tested by Home Assistant".
        logging.getLogger("homeassistant.loader").setLevel(logging.ERROR)
        # ai_task imports camera, which complains that libturbojpeg is missing.
        logging.getLogger("homeassistant.components.camera").setLevel(logging.CRITICAL)
        logging.getLogger("aiohttp_fast_zlib").setLevel(logging.ERROR)
    subprocess.run(["make", "-s", "-C", str(SIM_DIR)], check=True)
    with (
        tempfile.TemporaryDirectory(prefix="rockchip-llm-bench-") as work_path,
        asyncio.Runner(loop_factory=new_hass_event_loop) as loop_runner,
    ):
        work_dir = Path(work_path)
        if settings.startup_cache is not None:
            start = loop_runner.run(async_one_startup(settings, work_dir))
            print(json.dumps(start))
            return 0
        report = loop_runner.run(async_benchmark(settings, work_dir))
        count = ctypes.CDLL(str(SIM_LIBRARIES[settings.abi])).rkllm_sim_count_tokens
        count.argtypes = [ctypes.c_char_p]
        homes = loop_runner.run(
            async_prefix_figures(load_qwen3(), lambda text: count(text.encode()))
        )
        cache_hash = measure_cache_hash(settings.cache_hash_mb, work_dir)
    data = to_json(report) | {
        "prefix_per_home": figures_json(homes),
        "cache_hash": cache_hash,
    }
    print_report(data)
    print_prefix_table(homes)
    print_cache_hash(cache_hash)
    if settings.json_path is not None:
        settings.json_path.write_text(
            json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        print(f"\nJSON written to {settings.json_path}")
    if settings.plot_path is not None:
        write_plot(data, settings.plot_path)
        print(f"Chart written to {settings.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
