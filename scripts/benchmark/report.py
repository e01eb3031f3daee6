"""The report: the JSON document, the printed tables and the chart of one run."""

from collections.abc import Callable
from datetime import UTC, datetime
import os
from pathlib import Path
import platform
import statistics
from typing import Any

from homeassistant.const import __version__ as HA_VERSION

from .results import HandleTimes, OverheadSample, Report, TurnResult
from .scenario import (
    HANDLES,
    HOME,
    MODEL_CONTEXT_LIMIT,
    OVERHEAD_TARGETS,
    SIM_LIBRARIES,
    STRATEGIES,
    WORKER_TARGETS,
    Turn,
)


def fit_overhead(
    samples: list[OverheadSample],
    value: Callable[[OverheadSample], float],
    center: Callable[[list[float]], float] = statistics.median,
) -> tuple[float, float]:
    """Line value = a + b * generated tokens through the medians per reply length.

    Returns (ms per request, µs per token). Medians, not a least-squares fit of
    every sample: on a loaded machine a few requests wait far longer for a CPU.
    (center=statistics.fmean for coarse values, like CPU ticks, that only add up.)
    """
    groups: dict[int, list[float]] = {}
    for sample in samples:
        groups.setdefault(sample.generate_tokens, []).append(value(sample))
    if len(groups) < 2:
        return center([value(sample) for sample in samples]), 0.0
    lengths = sorted(groups)
    medians = [center(groups[length]) for length in lengths]
    slope, intercept = statistics.linear_regression(lengths, medians)
    return intercept, slope * 1000


def outside_sim(sample: OverheadSample) -> float:
    """Wall time minus the time the simulator reports for prefill and decode."""
    return sample.wall_ms - sample.prefill_ms - sample.generate_ms


def outside_prefill(sample: OverheadSample) -> float:
    """Wall time minus the simulator's prefill time (decode loop callbacks kept)."""
    return sample.wall_ms - sample.prefill_ms


def overhead_vs_reference(report: Report) -> dict[str, Any]:
    """Ours and the reference agent per request and per token, and the difference.

    The difference per request is also given as a ratio to HA's own rendering of
    the prompt (async_provide_llm_data), which every LLM agent pays: a measure that
    scales with the machine, unlike an absolute time.
    """
    ours = fit_overhead(report.overhead, outside_prefill) if report.overhead else None
    theirs = (
        fit_overhead(report.reference, lambda sample: sample.wall_ms)
        if report.reference
        else None
    )
    difference = (ours[0] - theirs[0], ours[1] - theirs[1]) if ours and theirs else None

    def fit(values: tuple[float, float] | None) -> dict[str, float | None]:
        return {
            "ms_per_request": _round(values[0], 3) if values else None,
            "us_per_token": _round(values[1], 2) if values else None,
        }

    cpu = _cpu_vs_reference(report)
    render_cpu = report.ha_prompt_cpu_ms

    def ratio(values: tuple[float, float] | None) -> float | None:
        return _round(values[0] / render_cpu, 2) if values and render_cpu > 0 else None

    return {
        "ours": fit(ours),
        "reference": fit(theirs),
        "ours_minus_reference": fit(difference),
        "ha_render_ms": _round(report.ha_prompt_ms, 3),
        "ratio_to_ha_render": _round(difference[0] / report.ha_prompt_ms, 2)
        if difference and report.ha_prompt_ms > 0
        else None,
        "ratio_by_round": _ratio_by_round(report),
        "targets": OVERHEAD_TARGETS,
        "cpu": {
            "ours_minus_reference": fit(cpu.get("ha")),
            "host_process": fit(cpu.get("host")),
            "worker_process": fit(cpu.get("worker")),
            "all_processes_minus_reference": fit(cpu.get("all")),
            "ha_render_ms": _round(render_cpu, 3),
            "ratio_to_ha_render": ratio(cpu.get("ha")),
            "ratio_all_processes_to_ha_render": ratio(cpu.get("all")),
            "method": (
                "CPU time instead of wall time (time.process_time of HA's process; "
                "the host's and the worker's from /proc/<pid>/task/*/schedstat; "
                "means for those two): what ours costs whatever else the machine "
                "runs, without the waiting for a CPU that wall time adds; the "
                "worker's includes the simulator's own work. ours_minus_reference "
                "is HA's process alone, all_processes_minus_reference adds the host "
                "and the worker"
            ),
        },
        "wakeups_per_request": _wakeups(report),
    }


def _ratio_by_round(report: Report) -> dict[str, Any] | None:
    """Return the wall-time ratio of each round on its own: how much it varies here.

    Each round's overhead (its samples, fitted as the whole) over HA's rendering
    timed in that round.
    """
    if not report.overhead or not report.reference:
        return None
    ratios = []
    for number, render_ms in enumerate(report.ha_prompt_ms_by_round):
        ours = fit_overhead(
            [sample for sample in report.overhead if sample.round == number],
            outside_prefill,
        )
        theirs = fit_overhead(
            [sample for sample in report.reference if sample.round == number],
            lambda sample: sample.wall_ms,
        )
        ratios.append(round((ours[0] - theirs[0]) / render_ms, 2))
    return {
        "ratios": ratios,
        "min": min(ratios),
        "median": _round(statistics.median(ratios), 2),
        "max": max(ratios),
    }


def _cpu_vs_reference(report: Report) -> dict[str, tuple[float, float]]:
    """CPU per request and token: ha (ours minus the reference), host, worker, all."""
    if not report.overhead or not report.reference:
        return {}
    ours = fit_overhead(report.overhead, lambda sample: sample.cpu_ms)
    theirs = fit_overhead(report.reference, lambda sample: sample.cpu_ms)
    host = fit_overhead(
        report.overhead, lambda sample: sample.host_cpu_ms, statistics.fmean
    )
    worker = fit_overhead(
        report.overhead, lambda sample: sample.worker_cpu_ms, statistics.fmean
    )
    ha = (ours[0] - theirs[0], ours[1] - theirs[1])
    return {
        "ha": ha,
        "host": host,
        "worker": worker,
        "all": (ha[0] + host[0] + worker[0], ha[1] + host[1] + worker[1]),
    }


def _wakeups(report: Report) -> dict[str, Any] | None:
    """Voluntary context switches per request and per token, by process (means)."""
    if not report.overhead or not report.reference:
        return None

    def per(samples: list[OverheadSample], name: str) -> dict[str, float | None]:
        request, token = fit_overhead(
            samples, lambda sample: sample.wakeups.get(name, 0), statistics.fmean
        )
        return {"per_request": _round(request, 2), "per_token": _round(token / 1000, 4)}

    return {
        "ours": {name: per(report.overhead, name) for name in ("ha", "host", "worker")},
        "reference": {"ha": per(report.reference, "ha")},
        "method": (
            "voluntary context switches of each process's threads during a request "
            "(/proc/<pid>/task/*/status): each is a thread that waited and was woken, "
            "a hand-over that waits for a CPU on a loaded machine"
        ),
    }


def handle_costs(times: HandleTimes) -> dict[str, float | int | None]:
    """Medians of one handle: per request (round trips) and per streamed token."""
    short = statistics.median(times.short_run)
    long = statistics.median(times.long_run)
    extra_tokens = times.long_tokens - times.short_tokens
    return {
        "clear_kv_cache_ms": _round(statistics.median(times.clear_kv_cache), 4),
        "short_run_ms": _round(short, 4),
        "long_run_ms": _round(long, 4),
        "short_run_tokens": times.short_tokens,
        "long_run_tokens": times.long_tokens,
        "us_per_token": _round(1000 * (long - short) / extra_tokens, 3)
        if extra_tokens > 0
        else None,
    }


def worker_overhead(report: Report) -> dict[str, Any] | None:
    """Return the worker_overhead section of the JSON (in_process, worker, added)."""
    if not report.handles:
        return None
    costs = {name: handle_costs(report.handles[name]) for name in HANDLES}

    def added(key: str, digits: int) -> float | None:
        inner, outer = costs["in_process"][key], costs["worker"][key]
        if inner is None or outer is None:
            return None
        return _round(float(outer) - float(inner), digits)

    settings = report.settings
    return {
        **costs,
        "added": {
            "us_per_token": added("us_per_token", 3),
            "ms_per_request": added("short_run_ms", 4),
            "clear_kv_cache_ms": added("clear_kv_cache_ms", 4),
        },
        "targets": WORKER_TARGETS,
        "method": (
            "the same zero-delay simulated model loaded in an RKLLMModel (binding "
            "on a thread of this process) and in a WorkerModel (a worker process, "
            "as the engine uses), driven directly off the event loop, the text "
            f"collected by list.append; {settings.worker_repetitions} repetitions "
            "(after 3 of warm-up) alternating between the two, each a "
            "clear_kv_cache round trip, a run with a short reply and a run with a "
            f"{settings.worker_reply_tokens}-token reply; medians. us_per_token = "
            "(long run - short run) / (difference in streamed tokens); "
            "ms_per_request = the short run's wall time (a whole request round "
            "trip); added = worker - in_process"
        ),
    }


def host_hop(report: Report) -> dict[str, Any] | None:
    """Return the host_hop section of the JSON: each link against the bare worker."""
    if not report.host_links or not report.handles:
        return None
    worker = handle_costs(report.handles["worker"])
    links = {name: handle_costs(times) for name, times in report.host_links.items()}

    def added(name: str, key: str, digits: int) -> float | None:
        outer, inner = links[name][key], worker[key]
        if inner is None or outer is None:
            return None
        return _round(float(outer) - float(inner), digits)

    def tls_added(key: str, digits: int) -> float | None:
        if "host_tls" not in links or "host_tcp" not in links:
            return None
        tls, tcp = links["host_tls"][key], links["host_tcp"][key]
        if tls is None or tcp is None:
            return None
        return _round(float(tls) - float(tcp), digits)

    handshake = report.host_handshake_ms
    return {
        **links,
        "hello_ms": report.host_hello_ms,
        "handshake_ms": handshake,
        "tls_added_to_tcp": {
            "us_per_token": tls_added("us_per_token", 3),
            "ms_per_request": tls_added("short_run_ms", 4),
            "handshake_ms": _round(handshake["host_tls"] - handshake["host_tcp"], 3)
            if {"host_tls", "host_tcp"} <= set(handshake)
            else None,
        },
        "added_to_worker": {
            name: {
                "us_per_token": added(name, "us_per_token", 3),
                "ms_per_request": added(name, "short_run_ms", 4),
                "clear_kv_cache_ms": added(name, "clear_kv_cache_ms", 4),
            }
            for name in links
        },
        "targets": WORKER_TARGETS,
        "method": (
            "the worker_overhead calls, made on the event loop through a runtime host "
            "(host processes on this Python) reached over a socket pair (the host Home "
            "Assistant starts itself), a Unix socket, plain TCP on 127.0.0.1 (the "
            "host's Host served without TLS by scripts/benchmark/plain_tcp_host.py) "
            "and TLS 1.3 with the pairing check (the host's --tcp), both TCP links "
            "with the heartbeat, alternating between the links; added_to_worker = "
            "link - worker (the worker driven directly, as in worker_overhead); "
            "tls_added_to_tcp = host_tls - host_tcp; hello_ms = connect and hello, "
            "once; handshake_ms = median time to open a connection (connect, and "
            "for TLS the handshake and the pairing), over 30 connections each"
        ),
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def ttft_summary(results: list[TurnResult], dialogue: list[Turn]) -> dict[str, Any]:
    """turn1, followup_mean (plain follow-up questions) and per_turn TTFT in ms."""
    per_turn = [result.ttft_ms for result in results]
    followups = [
        ttft
        for index, ttft in enumerate(per_turn)
        if index > 0 and ttft is not None and not dialogue[index].tool_call
    ]
    return {
        "turn1": _round(per_turn[0]) if per_turn else None,
        "followup_mean": _round(statistics.fmean(followups)) if followups else None,
        "per_turn": [_round(ttft) for ttft in per_turn],
    }


def to_json(report: Report) -> dict[str, Any]:
    """Return the benchmark's JSON document."""
    settings = report.settings
    dialogue = report.dialogue
    ours = report.turns.get("ours", [])
    total_new = sum(report.new_tokens)
    total_prefill = sum(result.prefill_tokens for result in ours)
    with_tools = total_new + report.tool_result_tokens
    prefill_ratio = total_prefill / with_tools if with_tools else None
    samples = report.overhead
    vs_reference = overhead_vs_reference(report)
    per_request = vs_reference["ours_minus_reference"]["ms_per_request"]
    per_token = vs_reference["ours_minus_reference"]["us_per_token"]
    perf_request, perf_token = (
        fit_overhead(samples, outside_sim) if samples else (0.0, 0.0)
    )
    long_samples = [s for s in samples if s.generate_tokens > 10]
    tool_turn = next(
        (index + 1 for index, turn in enumerate(dialogue) if turn.tool_call), None
    )
    conditions: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scenario": (
            "Home Assistant in-process (pytest-homeassistant-custom-component harness), "
            "conversation.async_converse, Assist API, agent prompt prompts/system.txt"
        ),
        "simulator": f"tests/rkllm_sim ABI {settings.abi} ({SIM_LIBRARIES[settings.abi].name})",
        "calibration": "RK3588, Qwen3-0.6B w8a8 (published rknn-llm figures)",
        "prefill_ms_per_token": settings.prefill_ms,
        "decode_ms_per_token": settings.decode_ms,
        "max_context_len": MODEL_CONTEXT_LIMIT,
        "exposed_entities": sum(len(specs) for specs in HOME.values()),
        "areas": len(HOME),
        "tools": report.tools,
        "system_prompt_tokens": report.system_prompt_tokens,
        "turns": len(dialogue),
        "tool_turn": tool_turn,
        "questions": [turn.question for turn in dialogue],
        "replies": {
            name: [result.reply for result in results]
            for name, results in report.turns.items()
        },
        "runs_per_turn": {
            name: [result.runs for result in results]
            for name, results in report.turns.items()
        },
        "history_reused_per_turn": {
            name: [result.history_reused for result in report.turns[name]]
            for name in ("ours", "full_prompt")
            if name in report.turns
        },
        "tool_calls_executed_by_ha": report.tool_calls_executed,
        "new_tokens_per_turn": report.new_tokens,
        "new_tokens_definition": (
            "rkllm_sim_count_tokens of the templated user turn: "
            "'<|im_start|>user\\n' + question + '<|im_end|>\\n<|im_start|>assistant\\n' "
            "+ the empty think block (thinking off); the tool result sent back to the "
            "model is new input too and is added once (tool_result_turn_tokens)"
        ),
        "user_text_tokens_per_turn": report.user_text_tokens,
        "tool_result_turn_tokens": report.tool_result_tokens,
        "prefill_ratio_user_turns_only": _round(
            total_prefill / total_new if total_new else None, 3
        ),
        "prefill_ratio_definition": (
            "ours: sum of prefilled tokens / sum of new tokens (user turns and the tool result)"
        ),
        "ttft_definition": {
            "ours": "converse call to the first content delta in the chat log",
            "full_prompt": "converse call to the first content delta in the chat log",
            "cache_per_conversation": (
                "start of the turn (prompt cache load included) to the first streamed "
                "text of the answering run, on the binding without Home Assistant; "
                "the tool turn feeds back the HA agent's tool result at once"
            ),
            "followup_mean": "mean of turns 2..N without the tool turn",
            "tool_turn": "includes decoding the tool call, the tool and the second run",
            "first_token": (
                "the simulator sleeps one decode step before the first token, while the "
                "published TTFT (199 ms for 128 tokens = 1.56 ms/token) already covers "
                "it: simulated TTFTs are about decode_ms_per_token above that model"
            ),
        },
        "strategies": {
            "ours": "history_strategy auto: system prompt cache + KV history reuse",
            "full_prompt": (
                "history_strategy off: no prompt cache, keep_history=0, history re-sent as "
                "turns in the prompt, full prefill every turn (the official demos' pattern)"
            ),
            "cache_per_conversation": (
                "rkllama's pattern on the binding: keep_history=0, the whole templated "
                "conversation every turn, one prompt cache file per conversation saved "
                "by every run and loaded before the next"
            ),
        },
        "prefill_tokens_definition": (
            "RKLLMResult.perf.prefill_tokens summed over the runs of the turn "
            "(two runs in the tool turn)"
        ),
        "overhead_method": (
            f"zero simulator delays, {len(samples)} requests in new conversations "
            f"through async_converse, alternating a 2-token and a "
            f"{settings.overhead_reply_tokens}-token reply, to ours and (taking turns) "
            "to the reference agent (scripts/benchmark/reference.py: the same chat-log "
            "calls and prompt, the same reply streamed token by token, no model); "
            "ours starts each run while HA renders the prompt (early_turn.py: the "
            "requests come from the same device, to a model idle with its prompt); "
            "wall time = a + b * streamed tokens through the medians per reply "
            "length, for each (ours: "
            "minus perf prefill_time_ms; perf generate_time_ms is not subtracted: at "
            "zero delay it is the time spent in our ctypes callback, which is "
            "integration overhead); overhead = ours - reference; HA's prompt "
            "rendering (ha_render_ms) is timed in the same rounds, after each pair "
            "of requests, so the ratio compares times taken under the same load; "
            f"{settings.overhead_rounds} rounds one after the other, fitted together "
            "and each on its own (ratio_by_round)"
        ),
        "overhead_vs_reference": vs_reference,
        "overhead_breakdown_ms_per_request": {
            "ha_async_provide_llm_data": _round(report.ha_prompt_ms, 3),
            "ours_prefix_from_chat_log": _round(report.prefix_ms, 3),
            "method": (
                "medians of separate timings of the same calls, one after each "
                "pair of requests of the overhead phase (_async_time_prompt in "
                "scripts/benchmark/strategies.py); both agents pay HA's, only ours "
                "pays prefix_from_chat_log (the compact prefix)"
            ),
        },
        "overhead_excluding_perf_generate_time": {
            "ms_per_request": _round(perf_request, 3),
            "us_per_token": _round(perf_token, 2),
        },
        "overhead_naive_long_replies": {
            "ms_per_request": _round(
                statistics.fmean(outside_prefill(s) for s in long_samples), 3
            )
            if long_samples
            else None,
            "us_per_token": _round(
                1000
                * sum(outside_prefill(s) for s in long_samples)
                / max(1, sum(s.generate_tokens for s in long_samples)),
                2,
            )
            if long_samples
            else None,
        },
        "overhead_ttft_ms_mean": _round(
            statistics.fmean(s.ttft_ms for s in samples if s.ttft_ms is not None), 3
        )
        if any(s.ttft_ms is not None for s in samples)
        else None,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "homeassistant": HA_VERSION,
            "load_average_1_5_15_min": {
                when: [round(value, 2) for value in load]
                for when, load in report.load_average.items()
            },
        },
    }
    return {
        "conditions": conditions,
        "ttft_ms": {
            name: ttft_summary(results, dialogue)
            for name, results in report.turns.items()
        },
        "prefill_tokens": {
            name: [result.prefill_tokens for result in results]
            for name, results in report.turns.items()
        },
        "prefill_ratio": _round(prefill_ratio, 3),
        "overhead_ms_per_request": _round(per_request, 3),
        "overhead_us_per_token": _round(per_token, 2),
        "overhead_ratio_to_ha_render": vs_reference["ratio_to_ha_render"],
        "worker_overhead": worker_overhead(report),
        "host_hop": host_hop(report),
        "startup": report.startup,
        "interleaved": interleaved(report),
    }


def interleaved(report: Report) -> dict[str, Any] | None:
    """Return the interleaved section: a switched-back follow-up next to a kept one."""
    if not report.interleaved:
        return None
    return {
        **{
            name: {
                "ttft_ms": _round(result.ttft_ms),
                "prefill_tokens": result.prefill_tokens,
                "prefill_ms": _round(result.prefill_ms),
                "history_reused": result.history_reused,
                "reply": result.reply,
            }
            for name, result in report.interleaved.items()
        },
        "method": (
            "ours (history_strategy auto): conversation A asks the dialogue's first "
            "three questions, conversation B one; A's next follow-up finds B in the "
            "KV (switched_back: the KV is cleared to the system cache and A's turns "
            "are sent again as turns), A's follow-up after it continues the KV (kept)"
        ),
    }


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    if value <= limit:
        return f"met ({value:.3g} ≤ {limit:g})"
    return f"MISSED by {value - limit:.3g} ({value:.3g} > {limit:g})"


def print_report(data: dict[str, Any]) -> None:
    """Print the tables and the targets."""
    conditions = data["conditions"]
    ttft = data["ttft_ms"]
    prefill = data["prefill_tokens"]
    reused = conditions["history_reused_per_turn"].get("ours", [])
    tool_turn = conditions["tool_turn"]
    names = [name for name in STRATEGIES if name in ttft]
    print(
        f"Simulated {conditions['calibration']}: prefill "
        f"{conditions['prefill_ms_per_token']} ms/token, decode "
        f"{conditions['decode_ms_per_token']} ms/token ({conditions['simulator']})"
    )
    print(
        f"System prompt {conditions['system_prompt_tokens']} tokens "
        f"(prompts/system.txt + Assist API, {conditions['exposed_entities']} exposed "
        f"entities in {conditions['areas']} areas, {conditions['tools']} tools); "
        f"{conditions['turns']} turns, tool call in turn {tool_turn}"
    )
    width = max(len(name) for name in names) + 2
    header = f"{'turn':>5} {'new':>4}" + "".join(f"{name:>{width}}" for name in names)

    def rows(cell: Callable[[str, int], str]) -> None:
        print(header)
        for index, new in enumerate(conditions["new_tokens_per_turn"]):
            mark = "*" if index + 1 == tool_turn else " "
            cells = "".join(f"{cell(name, index):>{width}}" for name in names)
            print(f"{index + 1:>4}{mark} {new:>4}{cells}")

    print("\nTTFT ms (to the first spoken text)")
    rows(lambda name, index: _cell(ttft[name]["per_turn"][index]))
    for key in ("turn1", "followup_mean"):
        cells = "".join(f"{_cell(ttft[name][key]):>{width}}" for name in names)
        print(f"{key:>14}{cells}")
    print("* tool turn (two runs), left out of followup_mean")

    print(
        "\nPrefilled tokens (perf.prefill_tokens; new = tokens of the templated turn)"
    )
    rows(
        lambda name, index: (
            f"{prefill[name][index]}"
            + ("!" if name == "ours" and index > 0 and not reused[index] else "")
        )
    )
    totals = "".join(f"{sum(prefill[name]):>{width}}" for name in names)
    print(f"{'total':>5} {sum(conditions['new_tokens_per_turn']):>4}{totals}")
    if any(not flag for flag in reused[1:]):
        print(
            "! ours did not continue the KV: reset to the system cache, history re-sent"
        )

    print(
        f"\nprefill_ratio (ours) {data['prefill_ratio']} (new = user turns + the "
        f"{conditions['tool_result_turn_tokens']}-token tool result; "
        f"{conditions['prefill_ratio_user_turns_only']} over user turns alone)"
    )
    versus = conditions["overhead_vs_reference"]
    print("\nOverhead against the reference agent (zero delays, medians)")
    print(f"{'':>22}{'ours':>12}{'reference':>12}{'overhead':>12}")
    for label, key in (
        ("ms per request", "ms_per_request"),
        ("µs per token", "us_per_token"),
    ):
        cells = "".join(
            f"{_cell(versus[name][key], 3):>12}"
            for name in ("ours", "reference", "ours_minus_reference")
        )
        print(f"{label:>22}{cells}")
    print(
        f"HA's own prompt rendering (async_provide_llm_data) {versus['ha_render_ms']} ms: "
        f"overhead = {data['overhead_ratio_to_ha_render']} x that; our prefix_from_chat_log "
        f"{conditions['overhead_breakdown_ms_per_request']['ours_prefix_from_chat_log']} ms"
    )
    if (by_round := versus["ratio_by_round"]) is not None:
        print(
            f"The ratio in each of the {len(by_round['ratios'])} rounds: "
            + ", ".join(f"{ratio:g}" for ratio in by_round["ratios"])
            + f" (median {by_round['median']:g})"
        )
    cpu = versus["cpu"]
    print(
        f"In CPU time: overhead {cpu['ours_minus_reference']['ms_per_request']} ms/request "
        f"(HA's rendering {cpu['ha_render_ms']} ms: {cpu['ratio_to_ha_render']} x), "
        f"{cpu['ours_minus_reference']['us_per_token']} µs/token in HA's process; "
        f"the host process {cpu['host_process']['ms_per_request']} ms/request, "
        f"{cpu['host_process']['us_per_token']} µs/token; "
        f"the worker process {cpu['worker_process']['ms_per_request']} ms/request, "
        f"{cpu['worker_process']['us_per_token']} µs/token; all three "
        f"{cpu['all_processes_minus_reference']['ms_per_request']} ms/request "
        f"({cpu['ratio_all_processes_to_ha_render']} x)"
    )
    if (wakeups := versus.get("wakeups_per_request")) is not None:
        print(
            "Wake-ups per request (voluntary context switches): "
            + ", ".join(
                f"{name} {value['per_request']}"
                for name, value in wakeups["ours"].items()
            )
            + f" (the reference's HA {wakeups['reference']['ha']['per_request']})"
        )

    for case, label in (("without_cache", "without"), ("with_cache", "with")):
        if (start := data["startup"].get(case)) is not None:
            how = "loaded" if start["cache_loaded"] else "built"
            print(
                f"HA start to agent ready {label} a system cache: "
                f"{start['ha_start_to_ready_ms']} ms (entry setup "
                f"{start['entry_setup_ms']} ms, cache {how}, "
                f"{start['cache_bytes']} bytes)"
            )

    if (mixed := data.get("interleaved")) is not None:
        print("\nTwo conversations on one model (ours): follow-ups of conversation A")
        print(f"{'':>26}{'TTFT ms':>9}{'prefilled':>11}{'prefill ms':>12}")
        for key, label in (
            ("switched_back", "after B (turns re-sent)"),
            ("kept", "continuing the KV"),
        ):
            row = mixed[key]
            print(
                f"{label:>26}{_cell(row['ttft_ms']):>9}{row['prefill_tokens']:>11}"
                f"{_cell(row['prefill_ms']):>12}"
            )

    worker = data["worker_overhead"]
    if worker is not None:
        print("\nWorker process against the in-process binding (zero delays, medians)")
        print(f"{'':>22}{'in_process':>12}{'worker':>12}{'added':>12}")
        for label, key, added_key in (
            ("µs per streamed token", "us_per_token", "us_per_token"),
            ("ms per request (run)", "short_run_ms", "ms_per_request"),
            ("ms clear_kv_cache", "clear_kv_cache_ms", "clear_kv_cache_ms"),
        ):
            cells = (
                "".join(f"{_cell(worker[name][key], 3):>12}" for name in HANDLES)
                + f"{_cell(worker['added'][added_key], 3):>12}"
            )
            print(f"{label:>22}{cells}")

    hop = data.get("host_hop")
    if hop is not None:
        print("\nRuntime host links, added to the bare worker (zero delays, medians)")
        links = list(hop["added_to_worker"])
        print(f"{'':>22}" + "".join(f"{name:>12}" for name in links))
        for label, key in (
            ("µs per streamed token", "us_per_token"),
            ("ms per request (run)", "ms_per_request"),
            ("ms clear_kv_cache", "clear_kv_cache_ms"),
        ):
            cells = "".join(
                f"{_cell(hop['added_to_worker'][name][key], 3):>12}" for name in links
            )
            print(f"{label:>22}{cells}")
        hello = "".join(f"{_cell(hop['hello_ms'][name], 1):>12}" for name in links)
        print(f"{'ms connect + hello':>22}{hello}")
        handshake = "".join(
            f"{_cell(hop['handshake_ms'].get(name), 3):>12}" for name in links
        )
        print(f"{'ms connection set-up':>22}{handshake}")
        tls = hop["tls_added_to_tcp"]
        print(
            "TLS and pairing over plain TCP: "
            f"{_cell(tls['us_per_token'], 3)} µs per token, "
            f"{_cell(tls['ms_per_request'], 3)} ms per request, "
            f"{_cell(tls['handshake_ms'], 3)} ms per connection"
        )

    followup = ttft.get("ours", {}).get("followup_mean")
    print("\nTargets (reported, not asserted)")
    print(f"  cached TTFT ≤ 60 ms (ours, follow-up mean): {_verdict(followup, 60)}")
    print(f"  prefill_ratio ≤ 1.05: {_verdict(data['prefill_ratio'], 1.05)}")
    load = conditions["machine"]["load_average_1_5_15_min"]
    limit = OVERHEAD_TARGETS["ratio_to_ha_render"]
    print(
        "  overhead ≤ HA's prompt rendering per request, wall time (load average "
        + " to ".join(f"{values[0]:g}" for values in load.values())
        + f"): {_verdict(data['overhead_ratio_to_ha_render'], limit)}"
    )
    print(
        "    the same in CPU time, HA's process: "
        f"{_verdict(cpu['ratio_to_ha_render'], limit)}; HA's, the host's and the "
        f"worker's: {_verdict(cpu['ratio_all_processes_to_ha_render'], limit)}"
    )
    print(
        "  overhead ≤ 100 µs/token: "
        f"{_verdict(data['overhead_us_per_token'], OVERHEAD_TARGETS['us_per_token'])}"
    )
    if worker is not None:
        for key, unit in (
            ("us_per_token", "µs/token"),
            ("ms_per_request", "ms/request"),
        ):
            limit = worker["targets"][key]
            print(
                f"  worker adds ≤ {limit:g} {unit}: "
                f"{_verdict(worker['added'][key], limit)}"
            )


def write_plot(data: dict[str, Any], path: Path) -> None:
    """Write a PNG: TTFT and prefilled tokens per turn, per strategy."""
    # Imported here: only --plot needs matplotlib.
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    conditions = data["conditions"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    turns = list(range(1, conditions["turns"] + 1))
    for name in STRATEGIES:
        if name not in data["ttft_ms"]:
            continue
        values = [
            float("nan") if v is None else v for v in data["ttft_ms"][name]["per_turn"]
        ]
        top.plot(turns, values, marker="o", label=name)
        bottom.plot(turns, data["prefill_tokens"][name], marker="o", label=name)
    if conditions["tool_turn"]:
        for axis in (top, bottom):
            axis.axvline(
                conditions["tool_turn"], color="grey", linestyle=":", linewidth=1
            )
    top.axhline(60, color="red", linestyle="--", linewidth=1, label="target 60 ms")
    top.set_yscale("log")
    top.set_ylabel("TTFT (ms, log scale)")
    top.set_title(
        f"TTFT per turn, simulated RK3588 Qwen3-0.6B "
        f"({conditions['prefill_ms_per_token']} / {conditions['decode_ms_per_token']} "
        f"ms per token); dotted: tool turn"
    )
    top.legend()
    top.grid(visible=True, which="both", alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_ylabel("prefilled tokens (log scale)")
    bottom.set_xlabel("turn")
    bottom.set_xticks(turns)
    bottom.grid(visible=True, alpha=0.3)
    bottom.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
