"""The trtllm profile's build tools: LLM export + TensorRT-LLM commands, vision ONNX + TensorRT plan, launch.

`python -m vlm_triton.trtllm {plan,export-llm,export-vision,launch}`; docs/trtllm.md walks through the steps.
"""
