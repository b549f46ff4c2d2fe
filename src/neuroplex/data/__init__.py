"""Data: the dataset registry (``load_dataset``), the built-in datasets, image readers (IDX,
image .npz, image folders), per-batch pixel transforms and user feature files."""

from neuroplex.data.registry import Dataset, Split, load_dataset

__all__ = ["Dataset", "Split", "load_dataset"]
