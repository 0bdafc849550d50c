"""Importers of annotated amodal datasets (KINS, KINS2020, COCOA, COCO-style amodal files): datamodules/imports/build.py."""
