"""``mipic-bench``: speed and peak memory of MIPIC's geometric term (nested top-k CKA)
for the naive loops, the eager reference, torch.compile and the Triton kernels."""
