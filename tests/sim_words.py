"""Words the simulator counts as one token each (tests/rkllm_sim/README.md, "Tokenizer")."""


def words(count: int) -> str:
    """Return count words of letters only: one simulator token each (a digit is one)."""
    return " ".join(
        "w"
        + chr(97 + index // 676 % 26)
        + chr(97 + index // 26 % 26)
        + chr(97 + index % 26)
        for index in range(count)
    )
