from vlm_triton.trtllm.cli import main

main()
