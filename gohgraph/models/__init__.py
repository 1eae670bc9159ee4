"""Models built from the blocks: the decoder-only GoHTransformer, generation, loading any saved family."""
