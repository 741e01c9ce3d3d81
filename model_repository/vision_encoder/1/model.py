"""Triton Python-backend entry point of the `vision_encoder` stage: the logic lives in the vlm_triton package."""

from vlm_triton.triton.vision_encoder_model import TritonPythonModel  # noqa: F401
