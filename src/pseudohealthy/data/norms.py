"""The names of the intensity normalisations (:func:`pseudohealthy.data.preprocess.normalise`).

Defined once here, in a module that imports nothing, so that the command line can offer them
without loading numpy.
"""

from __future__ import annotations

NORMS = ("max", "percentile", "median")
"""Intensity normalisations; the first is the reference's and the default."""
