"""Frozen feature extractors (timm and torchvision backbones, torch modules, callables) and their weights.

DKVB sits on top of a *frozen, pre-trained* encoder. This package turns an
encoder specification (a timm model name, ``"torchvision:<name>"``, an
``nn.Module`` or a plain callable) into a :class:`FrozenEncoder` that
validates raw inputs, preprocesses images with batched tensor operations and
embeds them in bounded-memory batches. The same machinery is exposed as
scikit-learn transformers, :class:`TimmEmbedder` and :class:`TorchEmbedder`.

Weights never come from the network: a model is built with random weights and
filled from a local ``checkpoint_path`` (safetensors or a torch state dict,
with foreign key names mapped by order and shape), or with ``pretrained=True``
from weights already in the local Hugging Face / torch hub cache. An encoder
built with random weights emits a :class:`RandomWeightsWarning`.

Modules: ``_weights`` (files and state dicts), ``_preprocess`` (data configs
and image preprocessing), ``_frozen`` (the frozen encoder and
:func:`build_encoder`), ``_embedders`` (the scikit-learn transformers),
``_disk_cache`` (the persistent embedding cache).
"""

from ._disk_cache import EmbeddingCache
from ._embedders import TimmEmbedder, TorchEmbedder
from ._frozen import FrozenEncoder, RandomWeightsWarning, build_encoder
from ._presets import dkvb_params_for_embeddings, resolve_auto_params
from ._weights import LoadReport, convert_checkpoint, load_foreign_state_dict, read_state_dict

__all__ = [
    "EmbeddingCache",
    "FrozenEncoder",
    "LoadReport",
    "RandomWeightsWarning",
    "TimmEmbedder",
    "TorchEmbedder",
    "build_encoder",
    "convert_checkpoint",
    "dkvb_params_for_embeddings",
    "load_foreign_state_dict",
    "read_state_dict",
    "resolve_auto_params",
]
