"""Serving a bundle on Triton Inference Server: `trm-export triton BUNDLE -o REPOSITORY` (repository), the loop
model Triton's Python backend runs (model, serving), and a local tritonserver for tests and benchmarks (server)."""
