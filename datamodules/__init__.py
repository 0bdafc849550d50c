"""Object sources, occlusion composites, HDF5 shards and LightningDataModules."""
