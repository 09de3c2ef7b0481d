"""Data: sources, the canonical dataset file, device batches, augmentation."""

from ssdd.data.dataset import ImageSet, load_dataset, save_dataset, stratified_fraction, stratified_split
from ssdd.data.device_data import BatchSampler, Normalizer
from ssdd.data.sources import load_source

__all__ = ["ImageSet", "load_dataset", "save_dataset", "stratified_split", "stratified_fraction",
           "BatchSampler", "Normalizer", "load_source"]
