#!/usr/bin/env python3
"""Thin wrapper: `build_scripts/trtllm.py plan|export-llm|export-vision|launch --deployment FILE ...`
(the same as `python -m vlm_triton.trtllm ...`; docs/trtllm.md walks through the steps)."""

from vlm_triton.trtllm.cli import main

if __name__ == "__main__":
    main()
