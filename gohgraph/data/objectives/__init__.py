"""Training objectives beyond next-token LM, on data that needs no download (DESIGN.md §13).

* :mod:`.mlm`: masked-LM inputs and labels (BERT's 15%, 80/10/10) from token windows;
* :mod:`.classify`: snippets of the standard library labelled by the package they come from.

Special tokens sit after the tokenizer's vocabulary (:class:`SpecialTokens`), so the byte
tokenizer's 256 ids keep their meaning and the model's vocabulary grows by three.
"""

from .special import SpecialTokens

OBJECTIVES = ("lm", "mlm", "classify")

__all__ = ["OBJECTIVES", "SpecialTokens"]
