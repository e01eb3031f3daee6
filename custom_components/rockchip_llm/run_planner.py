"""Turn a conversation into RKLLM runs and plan how much of the KV cache to reuse.

No Home Assistant imports: the entity converts chat-log content into ``Message``
records, this module decides what to send.
"""

from dataclasses import dataclass, field
import hashlib
import json
from typing import Literal

from .prompt_cache import prompt_sha256

type Role = Literal["user", "assistant", "tool", "local"]
""""local": a request Home Assistant handled itself, told as its note."""

REQUEST_MARKER = "Now the user says: "
"""Starts the request to answer after context in front of it (notes, a transcript)."""

CHARS_PER_TOKEN = 3
"""Conservative estimate for text we have not tokenised (real BPE: 3.5-4.5)."""

TURN_TEMPLATE_TOKENS = 16
"""Tokens the chat template puts around a turn (a bound for Qwen's ChatML)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation, reduced to what the model sees."""

    role: Role
    text: str
    tool_call_id: str | None = None
    """For a tool result: the id of the call it answers."""


@dataclass(frozen=True, slots=True)
class SystemPrefix:
    """The system prompt and tools that the runtime places before every turn."""

    prompt: str
    tools_json: str
    key: str = field(init=False, repr=False, compare=False)
    """Identifies the prefix (prompt and tools)."""
    prompt_sha256: str = field(init=False, repr=False, compare=False)
    tools_sha256: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Hash the prefix once: it is compared on every request."""
        object.__setattr__(self, "key", prefix_key(self.prompt, self.tools_json))
        object.__setattr__(self, "prompt_sha256", prompt_sha256(self.prompt))
        object.__setattr__(
            self, "tools_sha256", hashlib.sha256(self.tools_json.encode()).hexdigest()
        )

    @property
    def has_tools(self) -> bool:
        """Whether the prefix offers tools (else it is set as a chat template)."""
        return self.tools_json != NO_TOOLS


NO_TOOLS = "[]"


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """The three strings of rkllm_set_chat_template."""

    system: str
    user_prefix: str
    user_postfix: str


def chat_template(prompt: str, *, thinking: bool) -> ChatTemplate:
    """Return the Qwen (ChatML) template that sets prompt without tools.

    After an override the runtime ignores enable_thinking, so the empty thinking
    block that switches it off is part of the postfix.
    """
    return ChatTemplate(
        system=f"<|im_start|>system\n{prompt}<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_postfix="<|im_end|>\n<|im_start|>assistant\n"
        + ("" if thinking else "<think>\n\n</think>\n\n"),
    )


def prefix_key(prompt: str, tools_json: str) -> str:
    """Return the identity of a prompt + tools pair."""
    return hashlib.sha256(f"{prompt}\0{tools_json}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KVState:
    """What a model's KV cache holds after the system prefix."""

    prefix_key: str
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class RunPlan:
    """What the next run sends and whether the KV is kept or reset first."""

    role: Literal["user", "tool"]
    prompt: str
    reuse_history: bool
    """True: the KV holds the earlier messages; send only the new input."""
    max_new_tokens: int
    """The answer budget of this run (the agent's, or less when the context is full)."""
    dropped_messages: int = 0


def expected_prefill(prompt: str) -> int:
    """Bound the tokens a run of prompt prefills when its prefix is reused."""
    return estimate_tokens(prompt) + TURN_TEMPLATE_TOKENS


def reuse_honoured(prefill_tokens: int, expected: int, prefix_tokens: int) -> bool:
    """Whether a run that should have reused the prefix (and history) did.

    A run that recomputed the prefix prefills at least its tokens on top of the
    input; one that reused it stays near the input's estimate (an upper bound).
    """
    return prefill_tokens <= expected + max(TURN_TEMPLATE_TOKENS, prefix_tokens // 2)


def estimate_tokens(text: str) -> int:
    """Estimate the token count of text (upper bound, no tokenizer needed)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def pending_input(messages: list[Message]) -> tuple[list[Message], Message]:
    """Split messages into the answered history and the input to send now.

    Consecutive tool results become one tool input holding a JSON array.
    """
    index = len(messages)
    while index > 0 and messages[index - 1].role != "assistant":
        index -= 1
    history, new = messages[:index], messages[index:]
    if not new:
        raise ValueError("no new user or tool message to answer")
    tools = [message for message in new if message.role == "tool"]
    if tools and len(tools) == len(new):
        if len(tools) == 1:
            return history, tools[0]
        merged = json.dumps(
            [json.loads(tool.text) for tool in tools], ensure_ascii=False
        )
        return history, Message("tool", merged)
    users = "\n".join(message.text for message in new if message.role == "user")
    notes = [message.text for message in new if message.role == "local"]
    if notes:
        users = "\n".join([*notes, "", f"{REQUEST_MARKER}{users}"])
    return history, Message("user", users)


def trim_history(history: list[Message], max_history: int) -> list[Message]:
    """Keep the last max_history user turns (0 keeps everything)."""
    if max_history <= 0:
        return history
    user_indexes = [i for i, message in enumerate(history) if _is_request(message)]
    if len(user_indexes) <= max_history:
        return history
    return history[user_indexes[-max_history] :]


def fold_history(history: list[Message], new: Message) -> str:
    """Write earlier turns as a short transcript in front of the new input."""
    if not history:
        return new.text
    names = {"user": "User: ", "assistant": "Assistant: ", "tool": "Tool result: "}
    lines = [f"{names.get(message.role, '')}{message.text}" for message in history]
    transcript = "\n".join(lines)
    if new.role == "tool":
        return f"Earlier in this conversation:\n{transcript}\n\nTool result: {new.text}"
    request = new.text
    if REQUEST_MARKER in request:  # notes of Home Assistant's own handling go first
        notes, request = request.rsplit(REQUEST_MARKER, 1)
        transcript = f"{transcript}\n{notes.strip()}"
    return f"Earlier in this conversation:\n{transcript}\n\n{REQUEST_MARKER}{request}"


MIN_REPLY_TOKENS = 32
"""The smallest answer budget a run is given before a request is refused."""


class PromptTooLong(Exception):
    """Even without history and with the smallest answer, the input does not fit."""

    def __init__(self, budget: ContextBudget, input_tokens: int) -> None:
        """Keep the numbers for the log and the message."""
        super().__init__(
            f"{budget.prefix_tokens} prefix tokens + {input_tokens} input tokens + "
            f"{budget.floor} answer tokens > max_context_len {budget.max_context_len}"
        )
        self.budget = budget
        self.input_tokens = input_tokens

    @property
    def prefix_too_long(self) -> bool:
        """Whether the system prefix alone leaves no room for a turn and an answer.

        Otherwise the input itself (the user's text, a tool result) is too long.
        """
        budget = self.budget
        return (
            budget.prefix_tokens
            + budget.floor
            + budget.extra_tokens
            + TURN_TEMPLATE_TOKENS
            > budget.max_context_len
        )


@dataclass(frozen=True, slots=True)
class ContextBudget:
    """Token counts that bound the next run."""

    max_context_len: int
    prefix_tokens: int
    """Tokens of the system prefix (known from its cache build)."""
    kv_tokens: int
    """Tokens the KV holds now (prefix included)."""
    reply_tokens: int
    """Tokens wanted for the answer (max_new_tokens)."""
    extra_tokens: int = 0
    """Tokens sent with the input besides the messages (time line, instructions)."""

    @property
    def floor(self) -> int:
        """The smallest answer budget a run may get."""
        return min(self.reply_tokens, MIN_REPLY_TOKENS)

    def reply_for(self, base_tokens: int, input_tokens: int) -> int | None:
        """Return the answer budget left after base_tokens and the input (None: below floor)."""
        left = self.max_context_len - base_tokens - input_tokens - self.extra_tokens
        return min(self.reply_tokens, left) if left >= self.floor else None


def plan_run(
    kv: KVState | None,
    prefix: SystemPrefix,
    messages: list[Message],
    *,
    keep_history: bool,
    max_history: int,
    budget: ContextBudget,
) -> RunPlan:
    """Plan the cheapest run that answers the last input of messages.

    When the context is tight, turns before the current exchange (a tool call's
    question) are given up first, then the answer budget shrinks (down to a floor);
    only then is the request refused.
    """
    history, new = pending_input(messages)
    new_tokens = estimate_tokens(new.text)
    reuse_reply = (
        budget.reply_for(budget.kv_tokens, new_tokens)
        if keep_history
        and kv is not None
        and kv.prefix_key == prefix.key
        and tuple(history) == kv.messages
        and len(trim_history(history, max_history)) == len(history)
        else None
    )
    if reuse_reply == budget.reply_tokens:
        return RunPlan(_input_role(new), new.text, True, reuse_reply)
    candidates = _history_candidates(trim_history(history, max_history))
    exchange = _current_exchange(history, new)
    # 1. a full answer, giving up turns before the current exchange only
    for kept in candidates:
        if len(kept) < exchange:
            break
        reply = budget.reply_for(
            budget.prefix_tokens, estimate_tokens(fold_history(kept, new))
        )
        if reply == budget.reply_tokens:
            return _fresh_plan(kept, new, history, reply)
    # 2. the KV as it is, with a shorter answer
    if reuse_reply is not None:
        return RunPlan(_input_role(new), new.text, True, reuse_reply)
    # 3. only the current exchange (then not even that), with a shorter answer
    for kept in candidates:
        if len(kept) > exchange:
            continue
        reply = budget.reply_for(
            budget.prefix_tokens, estimate_tokens(fold_history(kept, new))
        )
        if reply is not None:
            return _fresh_plan(kept, new, history, reply)
    raise PromptTooLong(budget, new_tokens)


def _history_candidates(history: list[Message]) -> list[list[Message]]:
    """Histories to fold, longest first: dropping from the front, starting at a user."""
    candidates: list[list[Message]] = []
    for start in range(len(history) + 1):
        kept = history[start:]
        if not kept or _is_request(kept[0]):
            candidates.append(kept)
    return candidates


def _current_exchange(history: list[Message], new: Message) -> int:
    """How many history messages belong to the exchange new answers (a tool call's)."""
    if new.role != "tool":
        return 0
    for index in range(len(history) - 1, -1, -1):
        if history[index].role == "user":
            return len(history) - index
    return 0


def _fresh_plan(
    kept: list[Message], new: Message, history: list[Message], reply: int
) -> RunPlan:
    return RunPlan(
        _input_role(new) if not kept else "user",
        fold_history(kept, new),
        reuse_history=False,
        max_new_tokens=reply,
        dropped_messages=len(history) - len(kept),
    )


def _is_request(message: Message) -> bool:
    """Whether message starts a turn: the user's, or one Home Assistant handled."""
    return message.role in ("user", "local")


def _input_role(message: Message) -> Literal["user", "tool"]:
    return "tool" if message.role == "tool" else "user"
