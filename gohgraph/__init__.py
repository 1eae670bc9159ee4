"""gohgraph: Graph-of-Heads transformers with message-passing routers over heads and experts."""

from .attention import GoHAttention, KVCache
from .checkpoint import CheckpointError
from .config import GoHConfig
from .model import GoHOutput, GoHTransformer
from .router import HeadGate, HeadRouter, LinearHeadRouter
from .routing import LayerRouting

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "GoHAttention", "GoHConfig", "GoHOutput", "GoHTransformer", "HeadGate",
    "HeadRouter", "KVCache", "LayerRouting", "LinearHeadRouter", "__version__",
]
