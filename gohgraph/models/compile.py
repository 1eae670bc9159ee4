"""Where ``torch.compile`` cannot run: one warning of one line, shared by every compiled path.

``torch.compile`` fails lazily, at the first call, and its failures have no common type (no C++
compiler for inductor, an unsupported Python or platform, a graph it cannot trace). Each compiled
path (``generate(compile=True)``'s routers, the training step of ``TrainConfig.compile``) catches
the failure, stays eager, and says so with :func:`warn_compile_unavailable`; the CLI prints that
message as its one line.
"""

from __future__ import annotations

import warnings


class CompileUnavailableWarning(RuntimeWarning):
    """``torch.compile`` could not build a path, which runs eagerly instead (same outputs)."""


def compile_failure_reason(err: BaseException) -> str:
    """``"torch.compile is unavailable here (RuntimeError: <first line of the error>)"``."""
    first_line = (str(err).splitlines() or [""])[0]
    return f"torch.compile is unavailable here ({type(err).__name__}: {first_line})"


def warn_compile_unavailable(err: BaseException, consequence: str, stacklevel: int = 3) -> None:
    """Warn, in one line, that ``err`` stopped ``torch.compile`` and what runs instead
    (``consequence``, e.g. ``"decoding stays eager"``)."""
    warnings.warn(f"{compile_failure_reason(err)}; {consequence}", CompileUnavailableWarning, stacklevel=stacklevel)
