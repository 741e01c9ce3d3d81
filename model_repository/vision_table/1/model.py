"""Triton Python-backend entry point of the `vision_table` stage (ensemble only): the logic lives in the vlm_triton package."""

from vlm_triton.triton.vision_table_model import TritonPythonModel  # noqa: F401
