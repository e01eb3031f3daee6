"""The simulator's system block of a prefix (tests/rkllm_sim/README.md, "Chat template")."""

from custom_components.rockchip_llm.run_planner import SystemPrefix

TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query."
    "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
)
TOOLS_OUTRO = (
    "\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def sim_system_block(prefix: SystemPrefix) -> str:
    """Return the system block the simulator prefills for prefix."""
    if not prefix.has_tools:
        return f"<|im_start|>system\n{prefix.prompt}<|im_end|>\n"
    return (
        f"<|im_start|>system\n{prefix.prompt}\n\n{TOOLS_INTRO}<tools>\n"
        f"{prefix.tools_json}\n</tools>{TOOLS_OUTRO}<|im_end|>\n"
    )
