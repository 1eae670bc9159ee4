"""Data that needs no download: tokenizers, the default corpus and user text, batches."""
