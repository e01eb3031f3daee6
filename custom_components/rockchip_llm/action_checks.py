"""What an action asks of a model, checked before the runtime is asked.

Text the caller sends (a cache prompt, a benchmark question) is counted
conservatively (run_planner.estimate_tokens, an upper bound) against the context
the model was loaded with; what does not fit is the caller's error, answered as
a validation error that names the numbers.
"""

from homeassistant.exceptions import ServiceValidationError

from .const import DOMAIN
from .host.prompt_cache import CacheEntry
from .run_planner import (
    CHARS_PER_TOKEN,
    MIN_REPLY_TOKENS,
    ContextBudget,
    SystemPrefix,
    estimate_tokens,
)
from .session import ModelSession


def check_cache_prompt_fits(
    session: ModelSession, name: str, prefix: SystemPrefix
) -> None:
    """Refuse a cache whose prefix leaves no room for a question and an answer."""
    tokens = estimate_tokens(prefix.prompt) + estimate_tokens(prefix.tools_json)
    budget = ContextBudget(
        max_context_len=session.params.max_context_len,
        prefix_tokens=tokens,
        kv_tokens=tokens,
        reply_tokens=MIN_REPLY_TOKENS,
    )
    if budget.input_room >= 0:
        return
    raise _does_not_fit(
        "cache_prompt_does_not_fit",
        session,
        budget,
        tokens,
        name=name,
        characters=len(prefix.prompt),
        room=tokens + budget.input_room,
    )


def check_question_fits(
    session: ModelSession,
    agent: str,
    cache: CacheEntry,
    question: str,
    max_new_tokens: int,
) -> None:
    """Refuse a benchmark question that does not fit after the agent's system prompt."""
    prefix_tokens = cache.metadata.tokens if cache.metadata else 0
    budget = ContextBudget(
        max_context_len=session.params.max_context_len,
        prefix_tokens=prefix_tokens,
        kv_tokens=prefix_tokens,
        reply_tokens=max_new_tokens,
    )
    tokens = estimate_tokens(question)
    if tokens <= budget.input_room:
        return
    raise _does_not_fit(
        "question_does_not_fit",
        session,
        budget,
        tokens,
        agent=agent,
        prefix_tokens=prefix_tokens,
        room=max(budget.input_room, 0),
    )


def _does_not_fit(
    key: str,
    session: ModelSession,
    budget: ContextBudget,
    tokens: int,
    **placeholders: str | int,
) -> ServiceValidationError:
    """Return the validation error of text that does not fit, with its numbers."""
    return ServiceValidationError(
        translation_domain=DOMAIN,
        translation_key=key,
        translation_placeholders={
            "model": session.name,
            "tokens": str(tokens),
            "chars_per_token": str(CHARS_PER_TOKEN),
            "max_context_len": str(budget.max_context_len),
            **{name: str(value) for name, value in placeholders.items()},
        },
    )
