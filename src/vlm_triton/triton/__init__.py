"""The Triton adapter layer: the only place that imports triton_python_backend_utils."""
