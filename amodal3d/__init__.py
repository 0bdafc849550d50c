"""amodal3d: amodal instance segmentation guided by a 3D shape prior.

This package holds what every stage shares: the category table, the typed
config schema and loader, run folders and the command-line interface. The
computing parts live in the top-level packages models/, datamodules/,
metrics/, callbacks/ and lightning_modules/.
"""

__version__ = "0.1.0"
