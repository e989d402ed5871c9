"""Stage 4, evaluation: the benchmark's metrics (:mod:`.metrics`), pooled over test volumes
(:mod:`.evaluate`)."""
