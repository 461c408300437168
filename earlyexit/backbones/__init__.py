"""Backbone adapters: where exits may go in each timm/torchvision family, and how features look."""

from .adapter import (
    BackboneAdapter,
    FeatureLayout,
    find_adapter,
    register_adapter,
    supported_families,
    unregister_adapter,
)
from .families import register_builtin_adapters

register_builtin_adapters()

__all__ = [
    "BackboneAdapter",
    "FeatureLayout",
    "find_adapter",
    "register_adapter",
    "supported_families",
    "unregister_adapter",
]
