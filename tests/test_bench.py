"""Smoke test of scripts/bench (scripts/benchmark): tiny runs without delays, checking the JSON."""

import json
import os
from pathlib import Path
import subprocess
import sys

from awesomeversion import AwesomeVersion

from homeassistant.const import __version__ as HA_VERSION

from .conftest import REPO

BENCH = (sys.executable, "-m", "scripts.benchmark")
STRATEGIES = {"ours", "full_prompt", "cache_per_conversation"}
TOP_LEVEL = {
    "startup",
    "conditions",
    "ttft_ms",
    "prefill_tokens",
    "prefill_ratio",
    "overhead_ms_per_request",
    "overhead_us_per_token",
    "overhead_ratio_to_ha_render",
    "worker_overhead",
    "host_hop",
    "interleaved",
    "prefix_per_home",
    "cache_hash",
}
HANDLES = ("in_process", "worker")
HANDLE_TIMES = ("clear_kv_cache_ms", "short_run_ms", "long_run_ms", "us_per_token")


def test_bench_smoke(tmp_path: Path) -> None:
    """Two turns (the first one a tool call), zero delays: the JSON has the agreed shape."""
    json_path = tmp_path / "bench.json"
    plot_path = tmp_path / "bench.png"
    completed = subprocess.run(
        [
            *BENCH,
            "--turns=2",
            "--tool-turn=1",
            "--prefill-ms=0",
            "--decode-ms=0",
            "--cache-bytes-per-token=64",
            "--overhead-requests=2",
            "--overhead-rounds=2",
            "--overhead-reply-tokens=20",
            "--worker-repetitions=2",
            "--worker-reply-tokens=20",
            "--hash-mb=2",
            f"--json={json_path}",
            f"--plot={plot_path}",
        ],
        capture_output=True,
        text=True,
        timeout=180,  # a smoke of every phase, four runtime hosts among them
        check=False,
        cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "prefill_ratio" in completed.stdout
    assert plot_path.read_bytes().startswith(b"\x89PNG")

    data = json.loads(json_path.read_text())
    assert set(data) == TOP_LEVEL
    # A follow-up that found another conversation in the KV sends its turns again.
    mixed = data["interleaved"]
    assert mixed["switched_back"]["history_reused"] is False
    assert mixed["kept"]["history_reused"] is True
    assert mixed["switched_back"]["prefill_tokens"] > mixed["kept"]["prefill_tokens"]
    assert "after B (turns re-sent)" in completed.stdout
    homes = {home["home"]: home for home in data["prefix_per_home"]}
    assert list(homes) == ["one light", "HA demo", "150 entities, 12 areas"]
    for home in homes.values():
        # The simulator is never kinder than Qwen3: 0 to +10 % on these prefixes.
        assert 0 <= home["sim_over_real_pct"] <= 10, home
        assert home["qwen3_tokens"] < home["ha_qwen3_tokens"]
    if AwesomeVersion(HA_VERSION) >= "2026.10":  # users' HA (2026.6 says more)
        assert homes["HA demo"]["qwen3_tokens"] <= 4096 - 512
    assert homes["150 entities, 12 areas"]["qwen3_tokens"] <= 8192 - 512
    cache_hash = data["cache_hash"]
    assert (cache_hash["megabytes"], cache_hash["hash"]) == (2, "sha256")
    assert set(cache_hash["mb_per_s"]) == {"sha256", "blake2b", "sha1"}
    assert all(speed > 0 for speed in cache_hash["mb_per_s"].values())
    assert "Cache content check: sha256 of 2 MB" in completed.stdout
    # The second start loads the first one's system cache instead of building one.
    startup = data["startup"]
    assert startup["with_cache"]["cache_loaded"] is True
    assert startup["without_cache"]["cache_loaded"] is False
    assert (
        startup["with_cache"]["cache_bytes"]
        >= 64 * startup["with_cache"]["cache_tokens"]
    )
    assert set(data["ttft_ms"]) == STRATEGIES
    assert set(data["prefill_tokens"]) == STRATEGIES
    for name in STRATEGIES:
        ttft = data["ttft_ms"][name]
        assert set(ttft) == {"turn1", "followup_mean", "per_turn"}
        assert len(ttft["per_turn"]) == 2
        assert all(isinstance(value, float) and value > 0 for value in ttft["per_turn"])
        assert ttft["turn1"] == ttft["per_turn"][0]
        assert ttft["followup_mean"] == ttft["per_turn"][1]
        prefilled = data["prefill_tokens"][name]
        assert len(prefilled) == 2
        assert all(isinstance(value, int) and value > 0 for value in prefilled)
    for key in (
        "prefill_ratio",
        "overhead_ms_per_request",
        "overhead_us_per_token",
        "overhead_ratio_to_ha_render",
    ):
        assert isinstance(data[key], float), key

    # Our overhead is ours minus the reference agent, measured in the same run.
    versus = data["conditions"]["overhead_vs_reference"]
    for name in ("ours", "reference", "ours_minus_reference"):
        assert isinstance(versus[name]["ms_per_request"], float), name
        assert isinstance(versus[name]["us_per_token"], float), name
    assert (
        data["overhead_ms_per_request"]
        == versus["ours_minus_reference"]["ms_per_request"]
    )
    ours, reference = versus["ours"], versus["reference"]
    difference = ours["ms_per_request"] - reference["ms_per_request"]
    assert abs(data["overhead_ms_per_request"] - difference) <= 0.002  # rounding
    ratio = data["overhead_ms_per_request"] / versus["ha_render_ms"]
    assert abs(data["overhead_ratio_to_ha_render"] - ratio) <= 0.01 + abs(ratio) / 100
    assert versus["targets"] == {"ratio_to_ha_render": 1.0, "us_per_token": 100.0}
    # Each round's ratio on its own shows how much the machine lets it vary.
    by_round = versus["ratio_by_round"]
    assert len(by_round["ratios"]) == 2
    assert all(isinstance(value, float) for value in by_round["ratios"])
    assert by_round["min"] <= by_round["median"] <= by_round["max"]
    assert "The ratio in each of the 2 rounds: " in completed.stdout
    assert "2 rounds one after the other" in data["conditions"]["overhead_method"]
    # The same in CPU time, which waiting for a CPU on a loaded machine does not add to.
    cpu = versus["cpu"]
    for name in (
        "ours_minus_reference",
        "host_process",
        "worker_process",
        "all_processes_minus_reference",
    ):
        assert isinstance(cpu[name]["ms_per_request"], float), name
    assert cpu["host_process"]["ms_per_request"] > 0  # the host is measured too
    assert cpu["ha_render_ms"] > 0
    assert isinstance(cpu["ratio_to_ha_render"], float)
    assert isinstance(cpu["ratio_all_processes_to_ha_render"], float)
    assert "overhead ≤ HA's prompt rendering per request, wall time" in completed.stdout
    assert "the same in CPU time, HA's process" in completed.stdout
    # Each request wakes the host and the worker; the reference neither.
    wakeups = versus["wakeups_per_request"]
    assert set(wakeups["ours"]) == {"ha", "host", "worker"}
    assert wakeups["ours"]["host"]["per_request"] > 0
    assert wakeups["ours"]["worker"]["per_request"] > 0
    assert isinstance(wakeups["reference"]["ha"]["per_request"], float)
    load = data["conditions"]["machine"]["load_average_1_5_15_min"]
    assert set(load) == {"start", "end"}

    # The worker's added cost against the in-process binding: numbers, not values.
    worker = data["worker_overhead"]
    for name in HANDLES:
        for key in HANDLE_TIMES:
            assert isinstance(worker[name][key], float), (name, key)
        assert worker[name]["short_run_tokens"] == 2
        assert worker[name]["long_run_tokens"] == 20
    assert set(worker["added"]) == {
        "us_per_token",
        "ms_per_request",
        "clear_kv_cache_ms",
    }
    assert all(isinstance(value, float) for value in worker["added"].values())
    assert worker["targets"] == {"us_per_token": 100.0, "ms_per_request": 1.0}
    assert "worker adds ≤ 100 µs/token" in completed.stdout

    # The runtime host's links, each against the bare worker.
    hop = data["host_hop"]
    for name in ("host_local", "host_unix", "host_tcp", "host_tls"):
        for key in HANDLE_TIMES:
            assert isinstance(hop[name][key], float), (name, key)
        assert hop[name]["long_run_tokens"] == 20
        assert set(hop["added_to_worker"][name]) == {
            "us_per_token",
            "ms_per_request",
            "clear_kv_cache_ms",
        }
        assert hop["hello_ms"][name] > 0
    # Connection set-up (TLS and pairing on top of plain TCP), and what TLS adds.
    assert set(hop["handshake_ms"]) == {"host_unix", "host_tcp", "host_tls"}
    assert all(value > 0 for value in hop["handshake_ms"].values())
    assert set(hop["tls_added_to_tcp"]) == {
        "us_per_token",
        "ms_per_request",
        "handshake_ms",
    }
    assert all(isinstance(value, float) for value in hop["tls_added_to_tcp"].values())
    assert "Runtime host links" in completed.stdout
    assert "TLS and pairing over plain TCP:" in completed.stdout

    conditions = data["conditions"]
    assert conditions["prefill_ms_per_token"] == 0
    assert conditions["decode_ms_per_token"] == 0
    assert conditions["turns"] == 2
    assert conditions["tool_turn"] == 1
    # The dialogue ran as scripted: a tool call (two runs) and a follow-up.
    assert conditions["runs_per_turn"] == dict.fromkeys(STRATEGIES, [2, 1])
    # ours and full_prompt in turn 1, and the interleaved phase's four questions
    # that are the dialogue's turn 1 (A's first and third, B's, A's last).
    assert conditions["tool_calls_executed_by_ha"] == 2 + 4
    replies = conditions["replies"]
    assert (
        replies["ours"] == replies["full_prompt"] == replies["cache_per_conversation"]
    )
    assert replies["ours"][0] == "Done, the kitchen light is on now."
    # The whole system prompt is prefilled every turn only without any cache.
    system = conditions["system_prompt_tokens"]
    assert all(value > system for value in data["prefill_tokens"]["full_prompt"])
    assert all(value < system for value in data["prefill_tokens"]["ours"])


def test_restart_loads_the_cache(tmp_path: Path) -> None:
    """Two Home Assistant processes under different hash seeds: the second loads the
    system cache the first one built (the same prefix key in every process).
    """
    cache_dir = tmp_path / "cache"
    starts = []
    for seed in ("1", "2"):
        completed = subprocess.run(
            [
                *BENCH,
                "--prefill-ms=0",
                "--decode-ms=0",
                "--cache-bytes-per-token=64",
                f"--startup-only={cache_dir}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        starts.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    first, second = starts
    assert first["cache_created_at"] is not None
    assert second["cache_created_at"] == first["cache_created_at"]
