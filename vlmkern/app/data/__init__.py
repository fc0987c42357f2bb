"""Data formats (image-text CSV/TSV and webdataset shards, labelled images, CIR triplets), the
synthetic world (:mod:`.synthetic`) and real images from installed packages (:mod:`.real`)."""

from .datasets import (  # noqa: F401
    BadSampleError,
    CIRTriplets,
    ImageTextCSV,
    LabelledImages,
    WebDatasetTar,
    default_transform,
)
from . import real  # noqa: F401,E402
from .real import (  # noqa: F401,E402
    RealLabelledDataset,
    RealPairsDataset,
    SourceUnavailable,
    caption_pairs,
    digits_labelled,
    fashion_labelled,
    sources,
    tuxpaint_labelled,
)
