"""Stage 1, data: scans in and out (:mod:`.io`), into the model frame (:mod:`.preprocess`),
into the template frame (:mod:`.registration`), the five synthetic anomaly tasks
(:mod:`.anomalies`), healthy training slices and validation sets (:mod:`.dataset`) and the
bundled sample data (:mod:`.sample`). Owns the NIfTI conventions: canonical orientation, file
names, atomic writes."""
