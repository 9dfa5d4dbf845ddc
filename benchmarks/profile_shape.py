"""Runs the op's forward and backward a few times at one shape, for a profiler (e.g. ncu) to
capture the kernels: python benchmarks/profile_shape.py 8 1536 2048 16 [bf16|fp32]."""
import sys

import torch

from selective_scan import selective_scan

batch, dim, seqlen, dstate = (int(x) for x in sys.argv[1:5])
dtype = torch.float32 if len(sys.argv) > 5 and sys.argv[5] == "fp32" else torch.bfloat16
dev = "cuda"
u = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype, requires_grad=True)
delta = (0.5 * torch.randn(batch, dim, seqlen, device=dev)).to(dtype).requires_grad_(True)
A = (-torch.exp(0.5 * torch.randn(dim, dstate, device=dev))).requires_grad_(True)
B = torch.randn(batch, dstate, seqlen, device=dev, dtype=dtype, requires_grad=True)
C = torch.randn(batch, dstate, seqlen, device=dev, dtype=dtype, requires_grad=True)
D = torch.randn(dim, device=dev, requires_grad=True)
z = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype, requires_grad=True)
bias = (torch.rand(dim, device=dev) - 4).requires_grad_(True)
for _ in range(3):
    out = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    out.backward(torch.randn_like(out))
torch.cuda.synchronize()
