"""Turn a conversation into RKLLM runs and plan how much of the KV cache to reuse.

No Home Assistant imports: the entity converts chat-log content into ``Message``
records, this module decides what to send.
"""

from dataclasses import dataclass
import hashlib
import json
from typing import Literal

type Role = Literal["user", "assistant", "tool"]

CHARS_PER_TOKEN = 3
"""Conservative estimate for text we have not tokenised (real BPE: 3.5-4.5)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation, reduced to what the model sees."""

    role: Role
    text: str


@dataclass(frozen=True, slots=True)
class SystemPrefix:
    """The system prompt and tools that the runtime places before every turn."""

    prompt: str
    tools_json: str

    @property
    def key(self) -> str:
        """Identify the prefix (prompt and tools)."""
        return prefix_key(self.prompt, self.tools_json)

    @property
    def tools_sha256(self) -> str:
        """Identify the tools."""
        return hashlib.sha256(self.tools_json.encode()).hexdigest()


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
    dropped_messages: int = 0


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
    users = [message.text for message in new if message.role == "user"]
    return history, Message("user", "\n".join(users))


def trim_history(history: list[Message], max_history: int) -> list[Message]:
    """Keep the last max_history user turns (0 keeps everything)."""
    if max_history <= 0:
        return history
    user_indexes = [i for i, message in enumerate(history) if message.role == "user"]
    if len(user_indexes) <= max_history:
        return history
    return history[user_indexes[-max_history] :]


def fold_history(history: list[Message], new: Message) -> str:
    """Write earlier turns as a short transcript in front of the new input."""
    if not history:
        return new.text
    names = {"user": "User", "assistant": "Assistant", "tool": "Tool result"}
    lines = [f"{names[message.role]}: {message.text}" for message in history]
    transcript = "\n".join(lines)
    if new.role == "tool":
        return f"Earlier in this conversation:\n{transcript}\n\nTool result: {new.text}"
    return (
        f"Earlier in this conversation:\n{transcript}\n\nNow the user says: {new.text}"
    )


class PromptTooLong(Exception):
    """Even without history, the input does not fit the context."""


@dataclass(frozen=True, slots=True)
class ContextBudget:
    """Token counts that bound the next run."""

    max_context_len: int
    prefix_tokens: int
    """Tokens of the system prefix (known from its cache build)."""
    kv_tokens: int
    """Tokens the KV holds now (prefix included)."""
    reply_tokens: int
    """Tokens reserved for the answer (max_new_tokens)."""

    @property
    def fresh(self) -> int:
        """Tokens a run may add after a reset to the system prefix."""
        return self.max_context_len - self.prefix_tokens - self.reply_tokens

    @property
    def continued(self) -> int:
        """Tokens a run may add on top of the current KV."""
        return self.max_context_len - self.kv_tokens - self.reply_tokens


def plan_run(
    kv: KVState | None,
    prefix: SystemPrefix,
    messages: list[Message],
    *,
    keep_history: bool,
    max_history: int,
    budget: ContextBudget,
) -> RunPlan:
    """Plan the cheapest run that answers the last input of messages."""
    history, new = pending_input(messages)
    if (
        keep_history
        and kv is not None
        and kv.prefix_key == prefix.key
        and tuple(history) == kv.messages
        and len(trim_history(history, max_history)) == len(history)
        and estimate_tokens(new.text) <= budget.continued
    ):
        return RunPlan(_input_role(new), new.text, reuse_history=True)
    kept = trim_history(history, max_history)
    while kept and estimate_tokens(fold_history(kept, new)) > budget.fresh:
        kept = kept[1:]
    while kept and kept[0].role != "user":
        kept = kept[1:]
    prompt = fold_history(kept, new)
    if estimate_tokens(prompt) > budget.fresh:
        raise PromptTooLong
    return RunPlan(
        _input_role(new) if not kept else "user",
        prompt,
        reuse_history=False,
        dropped_messages=len(history) - len(kept),
    )


def _input_role(message: Message) -> Literal["user", "tool"]:
    return "tool" if message.role == "tool" else "user"
