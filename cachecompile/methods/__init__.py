"""Schedule methods beyond the core presets. Each module registers its method rules, action
kinds and step labels with :mod:`cachecompile.schedule` when imported."""
