"""Whether an agent can answer, and if not why: for its entities, diagnostics and Assist.

Home Assistant has a state for a config entry, not for its subentries: one agent
that cannot answer leaves the entry loaded (the others answer). Its repair says
why and how to fix it; its entities go unavailable, except those whose reading
explains the failure; Assist answers with one sentence naming the cause and where
to fix it; diagnostics list it with the same reason and numbers.
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from homeassistant.exceptions import HomeAssistantError

from .agent import Agent
from .const import DOMAIN
from .host.rkllm.errors import ModelInitError, WorkerDiedError

AGENT_ISSUE_KIND: Final = "agent_failed"
"""The fix flow kind of the repair of an agent that did not start."""


class AgentProblem(StrEnum):
    """Why an agent cannot answer."""

    MODEL_MISSING = "model_missing"
    """Its model folder is gone."""
    CONTEXT_ABOVE_LIMIT = "context_above_limit"
    """The runtime refused its context length: above the model's limit."""
    LOAD_CRASHED = "load_crashed"
    """The runtime process died while loading the model."""
    LOAD_FAILED = "load_failed"
    """The runtime refused to load the model (a broken file, a wrong runtime)."""
    PREPARE_FAILED = "prepare_failed"
    """Its system prompt could not be set up on the loaded model."""
    PREFIX_DOES_NOT_FIT = "prefix_does_not_fit"
    """Even trimmed, its system prompt leaves no room for a question."""
    GIVEN_UP = "given_up"
    """Its model's runtime process kept dying and is not started again."""


EXPLAINED_BY: Final[dict[AgentProblem, frozenset[str]]] = {
    AgentProblem.PREFIX_DOES_NOT_FIT: frozenset(
        {"prompt_cache", "system_prompt_tokens", "context_use"}
    ),
}
"""The sensors (by key) whose readings explain a problem: they stay available."""


@dataclass(frozen=True, slots=True)
class AgentFailure:
    """Why one agent cannot answer, in the runtime's words and numbers."""

    problem: AgentProblem
    error: str
    """The full reason, as its repair and the log give it."""
    numbers: dict[str, int] = field(default_factory=dict)
    """The numbers behind it (tokens, context, the model's limit), where known."""

    @property
    def explained_by(self) -> frozenset[str]:
        """The keys of the sensors whose readings explain the failure."""
        return EXPLAINED_BY.get(self.problem, frozenset())

    def answer(self, agent: str, model: str) -> HomeAssistantError:
        """Return the one-sentence answer Assist gives: what is wrong, where to fix it."""
        return HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key=f"agent_{self.problem.value}",
            translation_placeholders={
                "agent": agent,
                "model": model,
                **{key: str(value) for key, value in self.numbers.items()},
            },
        )

    def as_dict(self) -> dict[str, object]:
        """Describe the failure for diagnostics: state, reason, the runtime's words."""
        described: dict[str, object] = {
            "state": "failed",
            "reason": self.problem.value,
            "error": self.error,
        }
        return described | self.numbers


def load_failure(err: Exception) -> AgentFailure:
    """Describe a model that did not load, with the runtime's numbers."""
    reason = str(err) or type(err).__name__
    if isinstance(err, ModelInitError) and "limit" in err.placeholders:
        return AgentFailure(
            AgentProblem.CONTEXT_ABOVE_LIMIT,
            reason,
            {
                "max_context_len": int(err.placeholders["max_context_len"]),
                "model_limit": int(err.placeholders["limit"]),
            },
        )
    if isinstance(err, WorkerDiedError):
        return AgentFailure(AgentProblem.LOAD_CRASHED, reason)
    return AgentFailure(AgentProblem.LOAD_FAILED, reason)


def running_failure(agent: Agent) -> AgentFailure | None:
    """Why a set-up agent cannot answer now (None: it can)."""
    session = agent.session
    if session.failure is not None:
        return AgentFailure(AgentProblem.GIVEN_UP, str(session.failure))
    keeper = agent.system_cache
    if keeper is not None and (fit := keeper.fit) is not None and not fit.fits:
        numbers = {
            "tokens": fit.tokens,
            "max_context_len": fit.max_context_len,
            "needed_for_a_turn": fit.room,
        }
        if (limit := session.worker.context_limit) is not None:
            numbers["model_limit"] = limit
        return AgentFailure(
            AgentProblem.PREFIX_DOES_NOT_FIT,
            f"the system prompt takes {fit.tokens} tokens ({fit.counted_by} count) "
            f"even trimmed, leaving less than {fit.room} of its context of "
            f"{fit.max_context_len} tokens for a question and its answer",
            numbers,
        )
    return None
