"""Runtime: the torch side of the engine (model runner, sampler, attention metadata)."""
