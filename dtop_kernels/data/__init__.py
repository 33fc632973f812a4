"""Segmentation data: data sets on disk and mmsegmentation's transforms (Pillow + numpy).

- :mod:`.datasets`: the ADE20K layout as mmsegmentation reads it and an image/mask-folder
  layout (:func:`open_dataset`, :class:`SegmentationFolder`), :class:`DataError` naming the
  file and item of bad input, :class:`CheckedItems` to carry such errors out of loader workers.
- :mod:`.transforms`: mmseg's ADE20K train and test pipelines (:class:`TrainTransform`,
  :class:`EvalTransform`).
- :mod:`.synthetic`: a synthetic data set in either layout
  (``python -m dtop_kernels.data.synthetic``, ``write_synthetic_dataset``).

Training and evaluation on them: ``python -m dtop_kernels.train`` and
``python -m dtop_kernels.evaluate``.
"""

from dtop_kernels.data.datasets import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    CheckedItem,
    CheckedItems,
    DataError,
    SegmentationFolder,
    collate_checked,
    default_split,
    detect_layout,
    open_dataset,
    read_meta,
    require_pillow,
)
from dtop_kernels.data.transforms import (
    MEAN,
    STD,
    EvalTransform,
    TrainTransform,
    denormalize,
    normalize,
    photometric_distortion,
    rescale_size,
)

__all__ = [
    "ADE20K_CLASSES",
    "IGNORE_INDEX",
    "MEAN",
    "STD",
    "CheckedItem",
    "CheckedItems",
    "DataError",
    "EvalTransform",
    "SegmentationFolder",
    "TrainTransform",
    "collate_checked",
    "default_split",
    "denormalize",
    "detect_layout",
    "normalize",
    "open_dataset",
    "photometric_distortion",
    "read_meta",
    "require_pillow",
    "rescale_size",
]
