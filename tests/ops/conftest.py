from tests.ops._triton_interpreter import triton_interpreter  # noqa: F401  (the shared fixture)
