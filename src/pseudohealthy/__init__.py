"""pseudohealthy: anomaly detection in medical scans by image-conditioned diffusion restoration."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
