"""The published FSRE-Depth / Monodepth2 release format, both ways (docs/design.md).

`keys` maps each of our tensors to its file and key, `layout` infers the networks a folder
holds, `load` and `save` read and write folders, and `checkpoint` turns a release into a
Lightning checkpoint. The attention-scale conversion between the paper's and the reference's
CMA scaling (`keys.query_factor`, `keys.rescale_queries`) is the one checkpoint loading uses too.
"""

from fsre_lightning.reference.convert import (
    describe,
    release_checkpoint,
    release_module,
    write_checkpoint,
)
from fsre_lightning.reference.load import ReferenceRelease, load_reference_release
from fsre_lightning.reference.release_layout import ReleaseFormatError, ReleaseLayout
from fsre_lightning.reference.save import save_reference_release

__all__ = [
    "ReferenceRelease",
    "ReleaseFormatError",
    "ReleaseLayout",
    "describe",
    "load_reference_release",
    "release_checkpoint",
    "release_module",
    "save_reference_release",
    "write_checkpoint",
]
