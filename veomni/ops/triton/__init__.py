"""Our Triton kernels (model.ops.<op>=triton). Each module imports triton only when it is used, so
`import veomni` and the eager paths never need triton; each kernel has an eager reference it is
tested against under TRITON_INTERPRET=1 (tests/ops/)."""
