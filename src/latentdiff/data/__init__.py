"""Datasets and transforms: embedded datasets and image folders, loaded into memory as uint8."""

from latentdiff.data.config import DataConfig
from latentdiff.data.datasets import ImageData, load_dataset
from latentdiff.data.transforms import random_hflip, to_uint8_image

__all__ = ["DataConfig", "ImageData", "load_dataset", "random_hflip", "to_uint8_image"]
