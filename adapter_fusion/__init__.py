"""adapter-fusion: compose PEFT LoRA adapters exactly and fast, serve and export them."""

from adapter_fusion.adapters import Adapter, load_adapter, save_adapter
from adapter_fusion.delta import LowRankDelta
from adapter_fusion.errors import (
    AdapterFormatError,
    AdapterFusionError,
    AlreadyExistsError,
    IncompatibleAdaptersError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    OutputExistsError,
    PathNotAllowedError,
    RecipeError,
    UnsupportedAdapterError,
)
from adapter_fusion.merge import METHODS, MergeResult, ModuleReport, merge

__all__ = [
    "METHODS",
    "Adapter",
    "AdapterFormatError",
    "AdapterFusionError",
    "AlreadyExistsError",
    "IncompatibleAdaptersError",
    "InvalidRequestError",
    "LimitExceededError",
    "NotFoundError",
    "PathNotAllowedError",
    "LowRankDelta",
    "MergeResult",
    "ModuleReport",
    "OutputExistsError",
    "RecipeError",
    "UnsupportedAdapterError",
    "load_adapter",
    "merge",
    "save_adapter",
]
