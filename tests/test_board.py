"""Reading the board's facts from the kernel."""

from pathlib import Path

from custom_components.rockchip_llm.host import board


def test_read_npu_load_formats(tmp_path: Path) -> None:
    """Multi-core and single-core formats; unreadable or empty files give None."""
    path = tmp_path / "load"
    assert board.read_npu_load(path) is None
    path.write_text("NPU load:  25%\n")
    assert board.read_npu_load(path) == 25.0
    path.write_text("NPU load:  Core0: 1%, Core1: 2%,\n")
    assert board.read_npu_load(path) == 1.5
    path.write_text("garbage\n")
    assert board.read_npu_load(path) is None
