"""Step-cache policies (``EngineArgs(cache="fbcache" | "teacache", cache_threshold=...)``) and the
block-cache protocol models implement to support them (see ``diffcore.cache.base``)."""
from .base import CacheState, StepCache, rel_l1, supports_step_cache
from .policies import FirstBlockCache, TaylorFirstBlockCache, TeaCache

__all__ = ["CacheState", "StepCache", "FirstBlockCache", "TaylorFirstBlockCache", "TeaCache", "rel_l1", "supports_step_cache"]
