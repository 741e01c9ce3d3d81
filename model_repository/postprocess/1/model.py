"""Triton Python-backend entry point of the `postprocess` stage: the logic lives in the vlm_triton package."""

from vlm_triton.triton.postprocess_model import TritonPythonModel  # noqa: F401
