"""Pure ctypes binding to Rockchip's RKLLM runtime (no Home Assistant imports)."""
