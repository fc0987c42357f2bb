"""Data formats: image-text CSV/TSV and webdataset shards, labelled images, CIR triplets."""

from .datasets import (  # noqa: F401
    BadSampleError,
    CIRTriplets,
    ImageTextCSV,
    LabelledImages,
    WebDatasetTar,
    default_transform,
)
