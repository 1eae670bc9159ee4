"""Hugging Face conversion, one module per source family; exact logits are each family's test."""
