"""Datasets and transforms: embedded datasets and image folders in memory as uint8, or folders and WebDataset
shards streamed from disk."""

from latentdiff.data.config import DataConfig
from latentdiff.data.datasets import ImageData, load_dataset, open_dataset
from latentdiff.data.streamed import StreamedImages
from latentdiff.data.transforms import random_hflip, to_uint8_image

__all__ = ["DataConfig", "ImageData", "StreamedImages", "load_dataset", "open_dataset", "random_hflip",
           "to_uint8_image"]
