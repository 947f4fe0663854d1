"""Model families: one adapter file each (``llama``, ``gemma3``, ``phi3``, ``phi``), registered by model type.

Import from here: :func:`adapter_for`, :class:`ModelAdapter` (subclass it for a new family, then
:func:`register_adapter`), the views and slice maps (:class:`AttentionView`, :class:`MLPView`, :class:`Projection`,
:class:`Placement`).
"""

from lit_prune.arch.base import (
    AttentionView,
    MLPView,
    ModelAdapter,
    Placement,
    Projection,
    Unit,
    UnsupportedModelError,
    adapter_for,
    adapter_for_type,
    base_layer,
    block_linears,
    model_config,
    own_config,
    register_adapter,
    supported_model_types,
    text_config,
    unwrap,
)
from lit_prune.arch.gemma3 import Gemma3TextAdapter
from lit_prune.arch.llama import LlamaAdapter
from lit_prune.arch.phi import PhiAdapter
from lit_prune.arch.phi3 import Phi3Adapter

for _adapter in (LlamaAdapter(), Gemma3TextAdapter(), Phi3Adapter(), PhiAdapter()):
    register_adapter(_adapter)

__all__ = [
    "AttentionView",
    "Gemma3TextAdapter",
    "LlamaAdapter",
    "MLPView",
    "ModelAdapter",
    "Phi3Adapter",
    "PhiAdapter",
    "Placement",
    "Projection",
    "Unit",
    "UnsupportedModelError",
    "adapter_for",
    "adapter_for_type",
    "base_layer",
    "block_linears",
    "model_config",
    "own_config",
    "register_adapter",
    "supported_model_types",
    "text_config",
    "unwrap",
]
