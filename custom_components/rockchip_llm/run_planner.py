"""Turn a conversation into RKLLM runs and plan how much of the KV cache to reuse.

No Home Assistant imports: the entity converts chat-log content into ``Message``
records, this module decides what to send.
"""

from dataclasses import dataclass, field, replace
import hashlib
import json
from typing import Literal

from .host.prompt_cache import prompt_sha256

type Role = Literal["user", "assistant", "tool", "local"]
""""local": a request Home Assistant handled itself, told as its note."""

REQUEST_MARKER = "Now the user says: "
"""Starts the request to answer after the notes of what Home Assistant handled itself."""

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
    tool_calls: tuple[str, ...] = ()
    """For an answer: the tools it called, each as {"name", "arguments"} JSON."""


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
TOOL_RESPONSE_TAG = "tool_response"
"""The tag the chat template puts around a tool result (set with the tools)."""
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"


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
    """The role the run is sent with (the runtime's template wraps it)."""
    prompt: str
    """The new input as the model reads it (a tool result after history: in its tags)."""
    reuse_history: bool
    """True: the KV holds the earlier messages; send only the new input."""
    max_new_tokens: int
    """The answer budget of this run (the agent's, or less when the context is full)."""
    dropped_messages: int = 0
    history: str = ""
    """Earlier turns re-sent in front of the input, written as the template writes turns."""
    request: Literal["user", "tool"] = "user"
    """What the new input is: the user's request or a tool result."""

    def text(self, *, volatile: str = "", instructions: str | None = None) -> str:
        """Return the prompt of the run: history, then the new input.

        volatile (HA's current-time line) goes in front of a user request,
        instructions after the input.
        """
        text = f"{self.prompt}\n\n{instructions}" if instructions else self.prompt
        if volatile and self.request == "user":
            text = f"{volatile}\n\n{text}"
        return self.history + text


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
        return history, Message("tool", _merged_results(tools))
    users = "\n".join(message.text for message in new if message.role == "user")
    notes = [message.text for message in new if message.role == "local"]
    return history, Message("user", with_notes(notes, users))


def with_notes(notes: list[str], request: str) -> str:
    """Write what Home Assistant handled itself in front of the request it precedes."""
    if not notes:
        return request
    return "\n".join([*notes, "", f"{REQUEST_MARKER}{request}"])


def _merged_results(tools: list[Message]) -> str:
    """One tool input for several results: a JSON array of them."""
    if len(tools) == 1:
        return tools[0].text
    return json.dumps([json.loads(tool.text) for tool in tools], ensure_ascii=False)


def trim_history(history: list[Message], max_history: int) -> list[Message]:
    """Keep the last max_history user turns (0 keeps everything)."""
    if max_history <= 0:
        return history
    user_indexes = [i for i, message in enumerate(history) if _is_request(message)]
    if len(user_indexes) <= max_history:
        return history
    return history[user_indexes[-max_history] :]


def tool_response(result: str) -> str:
    """Write a tool result as the chat template writes it inside a user turn."""
    return f"<{TOOL_RESPONSE_TAG}>\n{result}\n</{TOOL_RESPONSE_TAG}>"


def templated_history(history: list[Message]) -> str:
    """Write earlier turns as the chat template writes turns (Qwen's ChatML).

    The text goes in front of the new input of a user run, which the runtime
    wraps in a user turn and follows with the assistant's: so it starts inside
    the first user turn (history starts with one) and ends by opening the turn
    of the new input. Answers carry their tool calls as the model wrote them;
    consecutive tool results are one turn, and notes of what Home Assistant
    handled itself share the turn of the request after them, as when first sent.
    """
    if not history:
        return ""
    turns: list[tuple[str, str]] = []
    index = 0
    while index < len(history):
        message = history[index]
        if message.role == "tool":
            end = index
            while end < len(history) and history[end].role == "tool":
                end += 1
            turns.append(("user", tool_response(_merged_results(history[index:end]))))
            index = end
            continue
        if message.role == "local":  # notes go in the turn of the request after them
            end = index
            while end < len(history) and history[end].role == "local":
                end += 1
            notes = [note.text for note in history[index:end]]
            if end < len(history) and history[end].role == "user":
                turns.append(("user", with_notes(notes, history[end].text)))
                end += 1
            else:
                turns.append(("user", "\n".join(notes)))
            index = end
            continue
        if message.role == "assistant":
            calls = [
                f"<tool_call>\n{call}\n</tool_call>" for call in message.tool_calls
            ]
            turns.append(("assistant", "\n".join(filter(None, [message.text, *calls]))))
        else:
            turns.append(("user", message.text))
        index += 1
    first, *rest = turns
    return (
        first[1]
        + "".join(f"{TURN_END}\n{TURN_START}{role}\n{text}" for role, text in rest)
        + f"{TURN_END}\n{TURN_START}user\n"
    )


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
        return self.budget.input_room < 0


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

    @property
    def input_room(self) -> int:
        """Tokens left for an input after the prefix, a turn's template and the smallest answer."""
        return (
            self.max_context_len
            - self.prefix_tokens
            - self.extra_tokens
            - TURN_TEMPLATE_TOKENS
            - self.floor
        )

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

    When the KV holds another conversation (or none), the run clears it and sends
    the earlier turns again as turns, the new input last. When the context is
    tight, turns before the current exchange (a tool call's question) are given
    up first, then the answer budget shrinks (down to a floor); only then is the
    request refused.
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
        return _kept_plan(new, reuse_reply)
    candidates = _history_candidates(trim_history(history, max_history))
    exchange = _current_exchange(history, new)
    # 1. a full answer, giving up turns before the current exchange only
    for kept in candidates:
        if len(kept) < exchange:
            break
        plan = _fresh_plan(kept, new, history, budget.reply_tokens)
        reply = budget.reply_for(budget.prefix_tokens, estimate_tokens(plan.text()))
        if reply == budget.reply_tokens:
            return plan
    # 2. the KV as it is, with a shorter answer
    if reuse_reply is not None:
        return _kept_plan(new, reuse_reply)
    # 3. only the current exchange (then not even that), with a shorter answer
    for kept in candidates:
        if len(kept) > exchange:
            continue
        plan = _fresh_plan(kept, new, history, budget.reply_tokens)
        reply = budget.reply_for(budget.prefix_tokens, estimate_tokens(plan.text()))
        if reply is not None:
            return replace(plan, max_new_tokens=reply)
    raise PromptTooLong(budget, new_tokens)


def _history_candidates(history: list[Message]) -> list[list[Message]]:
    """Histories to re-send, longest first: dropping from the front, starting at a user."""
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


def _kept_plan(new: Message, reply: int) -> RunPlan:
    """Send only the new input: the KV holds the conversation before it."""
    role = _input_role(new)
    return RunPlan(role, new.text, True, reply, request=role)


def _fresh_plan(
    kept: list[Message], new: Message, history: list[Message], reply: int
) -> RunPlan:
    """Send the kept turns again as turns, then the new input, on a cleared KV.

    A tool result after earlier turns is written in its tags inside the user run
    that carries them; alone it is sent as a tool run.
    """
    request = _input_role(new)
    if not kept:
        return RunPlan(
            request,
            new.text,
            reuse_history=False,
            max_new_tokens=reply,
            dropped_messages=len(history),
            request=request,
        )
    return RunPlan(
        "user",
        tool_response(new.text) if request == "tool" else new.text,
        reuse_history=False,
        max_new_tokens=reply,
        dropped_messages=len(history) - len(kept),
        history=templated_history(kept),
        request=request,
    )


def _is_request(message: Message) -> bool:
    """Whether message starts a turn: the user's, or one Home Assistant handled."""
    return message.role in ("user", "local")


def _input_role(message: Message) -> Literal["user", "tool"]:
    return "tool" if message.role == "tool" else "user"
