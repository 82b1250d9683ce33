"""Training scripts for the models shipped in :mod:`cachecompile.models`."""
