"""Training: one ensemble member per fold (:mod:`.train`)."""
