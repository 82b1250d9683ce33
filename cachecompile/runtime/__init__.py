"""The runtime: executes a step program (:class:`~cachecompile.core.program.StepProgram`) as a
drop-in module — the step clock (:mod:`.steps`), the cache store (:mod:`.cache_store`), the
cached transformer (:mod:`.cached`) and artifact loading (:mod:`.artifact`). It never imports the
compiler: in-memory and loaded programs run through the same code."""
