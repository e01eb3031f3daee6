"""Benchmark the Assist agent on a simulated RK3588 (see scripts/bench --help).

A real Home Assistant instance runs in this process (the test harness of
pytest-homeassistant-custom-component, storage kept in memory). The RKLLM simulator
(tests/rkllm_sim) stands in for librkllmrt.so, calibrated to the published RK3588
figures of Qwen3-0.6B w8a8. A 10-turn voice dialogue with one tool call is answered
three ways:

- ours: the integration's default (history_strategy auto: system prompt cache plus
  history reuse in the KV cache);
- full_prompt: the official demos' pattern (history_strategy off: no prompt cache,
  the whole prompt with the history re-sent as turns is prefilled every turn);
- cache_per_conversation: rkllama's pattern, driven directly on the binding
  (keep_history=0, one prompt cache file per conversation, saved on every run and
  loaded before the next, the whole templated conversation sent every turn).

A last phase measures the integration's own overhead with zero simulator delays,
and the cost the worker process adds against the in-process binding (the same
simulated model in an RKLLMModel and in a WorkerModel, driven directly); two fresh
Home Assistant starts measure the time to a ready agent without a system cache (it
is built) and with the one the first start wrote (it is loaded). Prompt-cache files
have a real KV dump's size (Qwen3-0.6B: about 112 KB per token), so writing and
loading them costs what it costs on a disk.

Modules, by job: scenario (the home, the dialogue, the simulated model files),
harness (a test Home Assistant, entries, timed conversations, and the only code
that reads the integration's internals), strategies (the measured phases),
results (what a run measured), report (JSON, table, chart), run (the phases in
order) and __main__ (the command line). Run from the repository root:
``python -m scripts.benchmark``.
"""

# Home Assistant first, as in its own start-up: from 2026.9 it aliases voluptuous to
# probatio, which must happen before anything else imports voluptuous.
import homeassistant  # noqa: F401
