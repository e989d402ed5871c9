"""Stage 4, evaluation: the benchmark's metrics (:mod:`.metrics`) pooled over test volumes in the
benchmark's frame (:mod:`.pooling`), the test sets on disk (:mod:`.testsets`) and each test case
turned into an entry, its anomaly map reused or restored (:mod:`.cases`); the evaluation frames
(:mod:`.choices`, their rules in :mod:`.frame`) and the restorations' fidelity (:mod:`.fidelity`)."""
