"""Stage 3, engine: the sampler plan and samplers (:mod:`.sampler`), the model-frame restoration
of slices by every member (:mod:`.frame`), anomaly maps and scores (:mod:`.maps`), the scan-level
restoration (:mod:`.restore`) and the naive reference loop it is tested against
(:mod:`.reference`)."""
