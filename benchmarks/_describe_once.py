import torch, sys
from pathlib import Path
from benchmarks.baselines import build_engine
from benchmarks.models import make_model
ckpt = make_model("internvl3-1b", Path("/tmp/pt/ckpt-internvl3-1b"))
_, e, _ = build_engine(ckpt, torch.device("cuda"), torch.bfloat16, 64, 4096)
print("plain python engine:", e.describe(), flush=True)
