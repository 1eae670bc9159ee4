"""Training objectives beyond next-token LM, on data that needs no download (docs/encoder.md, docs/seq2seq.md).

* :mod:`.mlm`: masked-LM inputs and labels (BERT's 15%, 80/10/10) from token windows;
* :mod:`.classify`: snippets of the standard library labelled by the package they come from, or
  user-labelled texts;
* :mod:`.seq2seq`: docstring -> ``def`` line pairs of the standard library, and the batches of any
  text pairs (user pairs: :mod:`gohgraph.data.record_files`).

Special tokens sit after the tokenizer's vocabulary (:class:`SpecialTokens`), so the byte
tokenizer's 256 ids keep their meaning and the model's vocabulary grows by three (four with
the seq2seq objective's end-of-sequence token).
"""

from .special import SpecialTokens

__all__ = ["SpecialTokens"]
