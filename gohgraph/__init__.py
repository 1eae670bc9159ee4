"""gohgraph: Graph-of-Heads transformers with message-passing routers over heads and experts."""

import os as _os
import sys as _sys

# Expert weight gradients are [E, d_in, d_out] tensors of tens of MB, allocated afresh every
# backward. Above glibc's 32 MB mmap ceiling each one is a new mapping whose 4 KB pages the kernel
# faults in and zeroes one by one: 12 ms per 45 MB gradient on a 2-core machine, more than the
# matmul that fills it (BENCHMARKS.md, MoE layer). PyTorch's own switch THP_MEM_ALLOC_ENABLE backs
# large CPU tensors with transparent huge pages, cutting that to ~2 ms. PyTorch reads it once, at
# its first allocation, so it can only be set here when torch is not imported yet; an explicit
# value in the environment always wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .config import GoHConfig
from .layers.attention import GoHAttention
from .layers.kv_cache import DynamicKVCache, KVCache
from .models.decoder import GoHOutput, GoHTransformer
from .models.encoder import EncoderOutput, GoHEncoder
from .models.pretrained import from_pretrained
from .models.seq2seq import GoHSeq2Seq, Seq2SeqOutput
from .routers.heads import HeadGate, HeadRouter, LinearHeadRouter
from .routing import ExpertRouting, LayerRouting
from .storage import CheckpointError
from .version import __version__

__all__ = [
    "CheckpointError", "DynamicKVCache", "EncoderOutput", "ExpertRouting", "GoHAttention", "GoHConfig", "GoHEncoder", "GoHOutput",
    "GoHSeq2Seq", "GoHTransformer", "HeadGate", "HeadRouter", "KVCache", "LayerRouting", "LinearHeadRouter",
    "Seq2SeqOutput", "__version__", "from_pretrained",
]
