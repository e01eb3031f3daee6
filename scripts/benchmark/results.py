"""What a run measured: per turn, per overhead request, per model handle, in all."""

from dataclasses import dataclass, field
from typing import Any

from .scenario import Settings, Turn


@dataclass(slots=True)
class TurnResult:
    """Measurements of one turn of one strategy."""

    ttft_ms: float | None
    wall_ms: float
    prefill_tokens: int
    prefill_ms: float
    generate_tokens: int
    runs: int
    reply: str
    generate_ms: float = 0.0
    """The runtime's decode time (only read by the overhead phase)."""
    history_reused: bool = False
    """Every run of the turn continued the KV."""
    tool_results: list[str] = field(default_factory=list)
    """Tool results as the chat log received them (before HA edits them)."""


@dataclass(slots=True)
class OverheadSample:
    """One zero-delay request of the overhead phase."""

    wall_ms: float
    ttft_ms: float | None
    prefill_ms: float
    generate_ms: float
    generate_tokens: int
    cpu_ms: float = 0.0
    """CPU time of Home Assistant's process (all its threads) during the request."""
    host_cpu_ms: float = 0.0
    """CPU time of the runtime host's process during the request."""
    worker_cpu_ms: float = 0.0
    """CPU time of the worker process during the request."""
    wakeups: dict[str, int] = field(default_factory=dict)
    """Voluntary context switches during the request, by process (ha, host, worker)."""
    round: int = 0
    """The round of the overhead phase (--overhead-rounds) the request belongs to."""


@dataclass(slots=True)
class HandleTimes:
    """Wall times (ms) of calls on one kind of model handle, driven directly."""

    clear_kv_cache: list[float] = field(default_factory=list)
    short_run: list[float] = field(default_factory=list)
    long_run: list[float] = field(default_factory=list)
    short_tokens: int = 0
    long_tokens: int = 0


@dataclass(slots=True)
class Report:
    """Everything measured in one benchmark run."""

    settings: Settings
    dialogue: list[Turn]
    system_prompt_tokens: int = 0
    tools: int = 0
    new_tokens: list[int] = field(default_factory=list)
    user_text_tokens: list[int] = field(default_factory=list)
    tool_result_tokens: int = 0
    turns: dict[str, list[TurnResult]] = field(default_factory=dict)
    overhead: list[OverheadSample] = field(default_factory=list)
    reference: list[OverheadSample] = field(default_factory=list)
    """The reference agent's requests, taking turns with the overhead phase's."""
    load_average: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """os.getloadavg() at the "start" and the "end" of the run."""
    ha_prompt_ms: float = 0.0
    ha_prompt_cpu_ms: float = 0.0
    ha_prompt_ms_by_round: list[float] = field(default_factory=list)
    prefix_ms: float = 0.0
    tool_calls_executed: int = 0
    startup: dict[str, dict[str, Any]] = field(default_factory=dict)
    """HA start to a ready agent: "without_cache" (built), "with_cache" (loaded)."""
    handles: dict[str, HandleTimes] = field(default_factory=dict)
    host_links: dict[str, HandleTimes] = field(default_factory=dict)
    """The same calls through a runtime host, by link (host_hop.HOST_LINKS)."""
    host_hello_ms: dict[str, float] = field(default_factory=dict)
    """Connecting to each host and its hello, once per connection."""
    host_handshake_ms: dict[str, float] = field(default_factory=dict)
    """Setting a connection up (connect, TLS and pairing), median, by link."""
    """The worker phase: "in_process" and "worker"."""
    interleaved: dict[str, TurnResult] = field(default_factory=dict)
    """Two conversations on one model: "switched_back" and "kept" follow-ups."""
