"""The wire formats: the Open Inference Protocol (v2: JSON and binary tensors), KServe v1's rows, and Triton's
extensions (model configuration, repository messages)."""
