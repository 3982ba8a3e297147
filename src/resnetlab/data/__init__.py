"""Data sets (digits, CIFAR, image folders, synthetic), validation splits and batch loaders."""

from .augment import BatchAugment
from .loader import InMemoryLoader, StreamingLoader
from .prepare import DATA_NAMES, PreparedData, load_source, prepare_data
from .types import DataSource, FileList, ImageArray

__all__ = [
    "DATA_NAMES",
    "BatchAugment",
    "DataSource",
    "FileList",
    "ImageArray",
    "InMemoryLoader",
    "PreparedData",
    "StreamingLoader",
    "load_source",
    "prepare_data",
]
