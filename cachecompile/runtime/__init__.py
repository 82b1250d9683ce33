"""Runtime of cachecompile: the drop-in ``CachedTransformer``, its cache store and the backends."""

from cachecompile.runtime.cache_store import CacheStore
from cachecompile.runtime.cached import CachedTransformer, InputMismatchError

__all__ = ["CachedTransformer", "CacheStore", "InputMismatchError"]
