"""Triton Python-backend entry point of the `bls` stage: the logic lives in the vlm_triton package."""

from vlm_triton.triton.bls_model import TritonPythonModel  # noqa: F401
