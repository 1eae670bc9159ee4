"""Small tensor ops with a slow reference each: a softmax for short routing dims, the grouped matmul of experts, BitNet's ternary/int8 quantisers and 2-bit packing."""
