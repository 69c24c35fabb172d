"""Our Triton kernels (the `triton` choice of `model.ops`): fused RMSNorm, RoPE, SwiGLU and the
chunked linear + cross-entropy over the loss positions.

Each module here imports triton at its top, so it is imported lazily by the dispatchers in
veomni/ops/{rms_norm,rope,swiglu,linear_ce}.py only when the `triton` choice runs: `import veomni`
and the eager path never need triton. Every kernel is a torch.autograd.Function with its own
backward, computes in fp32 whatever the input dtype, and is tested against the eager reference under
TRITON_INTERPRET=1 on CPU (tests/ops/test_triton_pointwise.py, tests/ops/test_triton_linear_ce.py).
"""
