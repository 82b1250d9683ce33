"""Runtime of cachecompile: the drop-in ``CachedTransformer``, its cache store and the backends."""

from runtime.cache_store import CacheStore
from runtime.cached import CachedTransformer, InputMismatchError

__all__ = ["CachedTransformer", "CacheStore", "InputMismatchError"]
