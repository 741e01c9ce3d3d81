"""Triton Python-backend entry point of the `llm` stage: the logic lives in the vlm_triton package."""

from vlm_triton.triton.llm_model import TritonPythonModel  # noqa: F401
