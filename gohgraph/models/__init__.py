"""Models built from the blocks: the three families (decoder, encoder, seq2seq) and their registry
(:mod:`gohgraph.models.families`), the shared output head, generation, loading any saved family."""
