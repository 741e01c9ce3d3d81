"""Triton Python-backend entry point of the `preprocess` stage: the logic lives in the vlm_triton package."""

from vlm_triton.triton.preprocess_model import TritonPythonModel  # noqa: F401
