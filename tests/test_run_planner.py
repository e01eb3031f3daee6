"""Planning runs: history reuse, resets, trimming and the context budget."""

import pytest

from custom_components.rockchip_llm.run_planner import (
    ContextBudget,
    KVState,
    Message,
    PromptTooLong,
    SystemPrefix,
    estimate_tokens,
    pending_input,
    plan_run,
)

PREFIX = SystemPrefix("You are a voice assistant.", "[]")
ROOMY = ContextBudget(
    max_context_len=4096, prefix_tokens=500, kv_tokens=600, reply_tokens=256
)


def dialogue(turns: int) -> list[Message]:
    """A dialogue of answered turns."""
    messages: list[Message] = []
    for turn in range(turns):
        messages += [
            Message("user", f"question {turn}"),
            Message("assistant", f"answer {turn}"),
        ]
    return messages


def test_follow_up_reuses_matching_kv() -> None:
    """When the KV holds exactly the earlier messages, only the new turn is sent."""
    history = dialogue(2)
    kv = KVState(PREFIX.key, tuple(history))
    plan = plan_run(
        kv,
        PREFIX,
        [*history, Message("user", "next")],
        keep_history=True,
        max_history=10,
        budget=ROOMY,
    )
    assert (plan.role, plan.prompt, plan.reuse_history) == ("user", "next", True)


@pytest.mark.parametrize(
    "kv",
    [
        None,
        KVState("another prefix", tuple(dialogue(2))),
        KVState(PREFIX.key, tuple(dialogue(1))),
    ],
)
def test_mismatch_resets_and_resends_turns(kv: KVState | None) -> None:
    """Any other KV content is reset; earlier turns are sent again as turns, the new one last.

    The runtime wraps the prompt in a user turn, so the text is exactly the
    conversation in the chat template's form.
    """
    plan = plan_run(
        kv,
        PREFIX,
        [*dialogue(2), Message("user", "next")],
        keep_history=True,
        max_history=10,
        budget=ROOMY,
    )
    assert not plan.reuse_history
    assert (plan.role, plan.request) == ("user", "user")
    wrapped = (
        f"<|im_start|>user\n{plan.text(volatile='Current time is 10:00.')}<|im_end|>\n"
    )
    assert wrapped == (
        "<|im_start|>user\nquestion 0<|im_end|>\n"
        "<|im_start|>assistant\nanswer 0<|im_end|>\n"
        "<|im_start|>user\nquestion 1<|im_end|>\n"
        "<|im_start|>assistant\nanswer 1<|im_end|>\n"
        "<|im_start|>user\nCurrent time is 10:00.\n\nnext<|im_end|>\n"
    )


def test_tool_result_after_a_reset_follows_its_call() -> None:
    """A tool result whose exchange is not in the KV: the call and result are turns again."""
    messages = [
        Message("user", "turn on the porch"),
        Message("assistant", "", tool_calls=('{"name": "HassTurnOn"}',)),
        Message("tool", '{"a": 1}', "call-1"),
        Message("tool", '{"b": 2}', "call-2"),
        Message("assistant", "Done."),
        Message("user", "and the kitchen"),
        Message("assistant", "On it.", tool_calls=('{"name": "HassTurnOn"}',)),
        Message("tool", '{"ok": true}', "call-3"),
    ]
    plan = plan_run(
        None, PREFIX, messages, keep_history=True, max_history=10, budget=ROOMY
    )
    assert (plan.role, plan.request, plan.reuse_history) == ("user", "tool", False)
    assert plan.text(volatile="Current time is 10:00.") == (
        "turn on the porch<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "HassTurnOn"}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n[{"a": 1}, {"b": 2}]\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nDone.<|im_end|>\n"
        "<|im_start|>user\nand the kitchen<|im_end|>\n"
        '<|im_start|>assistant\nOn it.\n<tool_call>\n{"name": "HassTurnOn"}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"ok": true}\n</tool_response>'
    )


def test_without_keep_history_never_reuses() -> None:
    """prompt_cache_only and off always send the whole conversation."""
    history = dialogue(1)
    kv = KVState(PREFIX.key, tuple(history))
    plan = plan_run(
        kv,
        PREFIX,
        [*history, Message("user", "next")],
        keep_history=False,
        max_history=10,
        budget=ROOMY,
    )
    assert not plan.reuse_history
    assert "question 0" in plan.history


def test_tool_results_are_merged() -> None:
    """Several tool results after one answer become one JSON array tool input."""
    history, new = pending_input(
        [
            Message("user", "lights"),
            Message("assistant", "calls"),
            Message("tool", '{"a": 1}'),
            Message("tool", '{"b": 2}'),
        ]
    )
    assert new == Message("tool", '[{"a": 1}, {"b": 2}]')
    assert len(history) == 2


def test_single_tool_result_is_sent_as_tool() -> None:
    """A tool result continuing the KV is sent with role tool."""
    history = [Message("user", "lights"), Message("assistant", "calls")]
    plan = plan_run(
        KVState(PREFIX.key, tuple(history)),
        PREFIX,
        [*history, Message("tool", '{"ok": true}')],
        keep_history=True,
        max_history=10,
        budget=ROOMY,
    )
    assert (plan.role, plan.prompt, plan.reuse_history) == (
        "tool",
        '{"ok": true}',
        True,
    )


def test_nothing_to_answer() -> None:
    """A log that ends with an answer has no pending input."""
    with pytest.raises(ValueError, match="no new user or tool message"):
        pending_input(dialogue(1))


def test_max_history_keeps_last_user_turns() -> None:
    """Only the last max_history user turns are folded."""
    plan = plan_run(
        None,
        PREFIX,
        [*dialogue(5), Message("user", "next")],
        keep_history=False,
        max_history=2,
        budget=ROOMY,
    )
    assert "question 2" not in plan.history
    assert "question 3" in plan.history
    assert "question 4" in plan.history
    assert plan.dropped_messages == 6


def test_budget_drops_oldest_turns() -> None:
    """Turns that do not fit the context are dropped, oldest first, whole turns only."""
    long_history = [
        Message("user", "q" * 300),
        Message("assistant", "a" * 300),
        Message("user", "short"),
        Message("assistant", "ok"),
    ]
    budget = ContextBudget(
        max_context_len=1000, prefix_tokens=600, kv_tokens=600, reply_tokens=256
    )
    plan = plan_run(
        None,
        PREFIX,
        [*long_history, Message("user", "next")],
        keep_history=True,
        max_history=0,
        budget=budget,
    )
    assert "q" * 300 not in plan.text()
    assert plan.history.startswith("short<|im_end|>")
    assert plan.max_new_tokens == 256
    assert estimate_tokens(plan.text()) <= 1000 - 600 - 256
    assert plan.dropped_messages == 2


def test_full_kv_falls_back_to_reset() -> None:
    """A KV too full for the new turn is reset instead of overflowing."""
    history = dialogue(1)
    full = ContextBudget(
        max_context_len=1000, prefix_tokens=300, kv_tokens=990, reply_tokens=100
    )
    plan = plan_run(
        KVState(PREFIX.key, tuple(history)),
        PREFIX,
        [*history, Message("user", "next please")],
        keep_history=True,
        max_history=10,
        budget=full,
    )
    assert not plan.reuse_history


def test_prompt_too_long() -> None:
    """An input that cannot fit even alone raises PromptTooLong."""
    tight = ContextBudget(
        max_context_len=700, prefix_tokens=600, kv_tokens=600, reply_tokens=64
    )
    with pytest.raises(PromptTooLong):
        plan_run(
            None,
            PREFIX,
            [Message("user", "word " * 100)],
            keep_history=True,
            max_history=10,
            budget=tight,
        )


NOTE = Message("local", "Home Assistant handled this itself, without you: ...")


def test_home_assistants_own_turns_come_before_the_request() -> None:
    """Notes of locally handled requests precede the request, with the KV or without."""
    history = dialogue(1)
    messages = [*history, NOTE, Message("user", "next")]
    reused = plan_run(
        KVState(PREFIX.key, tuple(history)),
        PREFIX,
        messages,
        keep_history=True,
        max_history=10,
        budget=ROOMY,
    )
    assert reused.reuse_history
    assert reused.prompt == f"{NOTE.text}\n\nNow the user says: next"
    resent = plan_run(
        None, PREFIX, messages, keep_history=True, max_history=10, budget=ROOMY
    )
    assert not resent.reuse_history
    assert resent.text() == (
        "question 0<|im_end|>\n<|im_start|>assistant\nanswer 0<|im_end|>\n"
        f"<|im_start|>user\n{NOTE.text}\n\nNow the user says: next"
    )
    # An answered note is re-sent in its request's turn, as first sent, and counts
    # as a turn.
    later = [*messages, Message("assistant", "Hi."), Message("user", "again")]
    plan = plan_run(None, PREFIX, later, keep_history=True, max_history=2, budget=ROOMY)
    assert plan.text() == (
        f"{NOTE.text}\n\nNow the user says: next<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n<|im_start|>user\nagain"
    )
