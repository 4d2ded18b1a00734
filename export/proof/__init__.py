"""The proof that an export computes the eager model's function (verify.py; named.py for several named tensors):
proving reads exports and writes only its report, and exporting never imports it."""
