"""Stage 2, model: the conditioned UNet and its presets (:mod:`.network`), the noise schedule
and training objective (:mod:`.diffusion`), checkpoints and ensembles on disk
(:mod:`.checkpoint`) and the weight average (:mod:`.ema`)."""
