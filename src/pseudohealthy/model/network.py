"""The denoising network: an image-conditioned 2D UNet built on MONAI's ``DiffusionModelUNet``.

Conditioning is by channel concatenation: the network sees ``cat([x_t, cond])`` (``x_t`` first)
and predicts the noise ``eps`` of ``x_t``. An unconditioned model (the baseline: a plain DDPM
that restores by partial noising) sees ``x_t`` alone.

Attention placement. MONAI's ``attention_levels`` are per resolution level (level 0 = full
resolution) and the decoder mirrors the encoder. The reference network has attention at
64, 32, 16 px in the encoder but at 128, 64, 32 px in the decoder (its decoder list is not the
mirror of the encoder's); ``decoder_attention_levels`` reproduces that: preset "paper",
72.4M parameters, the count the reference quotes. "paper-mirrored" keeps MONAI's mirrored
decoder (attention at 64, 32, 16 px on both sides, 75.4M parameters), which avoids full
self-attention over 16,384 tokens at 128x128.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_up_block
from torch import nn

from pseudohealthy.data.preprocess import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from pseudohealthy.errors import PseudohealthyError

__all__ = [
    "MAX_CHANNELS",
    "MAX_IMAGE_CHANNELS",
    "MAX_LEVELS",
    "MAX_RES_BLOCKS",
    "PRESETS",
    "ConditionedUNet",
    "ConfigError",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "get_preset",
]


# Sane bounds of every size setting, so that an edited configuration is refused before anything
# is allocated (the checkpoint loader validates a member's settings through ModelConfig). The
# image size bounds are the model frame's (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE of data.preprocess).
MAX_LEVELS = 8  # resolution levels (entries of ``channels``)
MAX_CHANNELS = 2048  # feature channels of one level; also bounds head channels and norm groups
MAX_RES_BLOCKS = 8
MAX_IMAGE_CHANNELS = 16


class ConfigError(PseudohealthyError, ValueError):
    """A model configuration is invalid; ``field`` names the offending setting."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        self.problem = problem
        self.field = field
        super().__init__(f"model setting '{field}': {problem}" if field else problem)


@dataclass(frozen=True)
class ModelConfig:
    """Every architecture setting of the network (all JSON-serialisable via :meth:`to_dict`).

    ``num_res_blocks`` counts encoder res blocks per level; MONAI's decoder uses one more per
    level (2 -> 3, as in the reference). ``num_head_channels`` is the attention head dimension.
    ``use_flash_attention`` selects PyTorch's fused ``scaled_dot_product_attention``; it does not
    change the weights and can be toggled at run time (:meth:`ConditionedUNet.set_fused_attention`).
    """

    image_size: int = 128
    channels: tuple[int, ...] = (128, 256, 256, 512)
    attention_levels: tuple[bool, ...] = (False, True, True, True)
    num_res_blocks: int = 2
    num_head_channels: int = 8
    norm_num_groups: int = 32
    conditioned: bool = True
    image_channels: int = 1
    decoder_attention_levels: tuple[bool, ...] | None = None
    norm_eps: float = 1e-6
    resblock_updown: bool = False
    include_fc: bool = True
    use_combined_linear: bool = False
    use_flash_attention: bool = True

    def __post_init__(self) -> None:
        # normalise sequences (JSON gives lists) so configs compare and hash consistently; the
        # entries must already be integers / true-false ("false" is not read as True)
        object.__setattr__(self, "channels", _int_tuple(self.channels, "channels"))
        object.__setattr__(self, "attention_levels", _bool_tuple(self.attention_levels, "attention_levels"))
        if self.decoder_attention_levels is not None:
            object.__setattr__(
                self,
                "decoder_attention_levels",
                _bool_tuple(self.decoder_attention_levels, "decoder_attention_levels"),
            )
        self.validate()

    @property
    def in_channels(self) -> int:
        """Network input channels: ``image_channels`` for x_t, doubled when conditioned."""
        return self.image_channels * (2 if self.conditioned else 1)

    @property
    def decoder_attention(self) -> tuple[bool, ...]:
        """Decoder attention per level (level 0 = full resolution)."""
        return self.decoder_attention_levels or self.attention_levels

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent or out-of-bounds setting.

        Every size is bounded (``MIN_IMAGE_SIZE``..``MAX_IMAGE_SIZE``, at most ``MAX_LEVELS``
        levels of at most ``MAX_CHANNELS`` channels, ``MAX_RES_BLOCKS``, ``MAX_IMAGE_CHANNELS``),
        so that a validated config never asks for an absurd network.
        """
        for name, low, high in (
            ("image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
            ("num_res_blocks", 1, MAX_RES_BLOCKS),
            ("num_head_channels", 1, MAX_CHANNELS),
            ("norm_num_groups", 1, MAX_CHANNELS),
            ("image_channels", 1, MAX_IMAGE_CHANNELS),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"must be an integer in {low}..{high}, got {value!r}", name)
        for name in (
            "conditioned",
            "resblock_updown",
            "include_fc",
            "use_combined_linear",
            "use_flash_attention",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"must be true or false, got {getattr(self, name)!r}", name)
        levels = len(self.channels)
        if not 1 <= levels <= MAX_LEVELS or any(not 1 <= c <= MAX_CHANNELS for c in self.channels):
            shown = self.channels if levels <= MAX_LEVELS else f"{levels} levels"
            raise ConfigError(
                f"must be 1..{MAX_LEVELS} integers in 1..{MAX_CHANNELS}, got {shown}", "channels"
            )
        if len(self.attention_levels) != levels:
            raise ConfigError(f"needs one entry per level ({levels})", "attention_levels")
        if self.decoder_attention_levels is not None and len(self.decoder_attention_levels) != levels:
            raise ConfigError(f"needs one entry per level ({levels})", "decoder_attention_levels")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ConfigError(f"every channel count must be divisible by {self.norm_num_groups}", "channels")
        for level, attn in enumerate(self.attention_levels + tuple(self.decoder_attention)):
            c = self.channels[level % levels]
            if attn and c % self.num_head_channels:
                raise ConfigError(
                    f"{c} channels not divisible into heads of {self.num_head_channels}", "num_head_channels"
                )
        if self.image_size % 2 ** (levels - 1):
            raise ConfigError(f"must be divisible by {2 ** (levels - 1)} for {levels} levels", "image_size")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, float | int) or not 0 < eps <= 1:
            raise ConfigError(f"must be a number in (0, 1], got {eps!r}", "norm_eps")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every setting (tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown or missing settings raise :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping of settings, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"unknown setting (known: {', '.join(names)})", unknown[0])
        missing = [n for n in names if n not in data]
        if missing:
            raise ConfigError("missing setting", missing[0])
        for name in ("channels", "attention_levels", "decoder_attention_levels"):
            value = data[name]
            if value is None and name == "decoder_attention_levels":
                continue
            if not isinstance(value, Sequence) or isinstance(value, str):
                raise ConfigError(f"must be a list, got {value!r}", name)
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(str(exc)) from exc

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some settings changed (validated)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError("unknown setting", unknown[0])
        return dataclasses.replace(self, **overrides)


def _int_tuple(value: Any, name: str) -> tuple[int, ...]:
    """``value`` (a list or tuple of integers) as a tuple; anything else is a ConfigError."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence | np.ndarray):
        raise ConfigError(f"must be a list of integers, got {value!r}", name)
    if len(value) > MAX_LEVELS:
        raise ConfigError(f"must have at most {MAX_LEVELS} entries, got {len(value)}", name)
    if any(isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral) for v in value):
        raise ConfigError(f"must be a list of integers, got {list(value)!r}", name)
    return tuple(int(v) for v in value)


def _bool_tuple(value: Any, name: str) -> tuple[bool, ...]:
    """``value`` (a list or tuple of true/false) as a tuple; strings such as "false" are refused."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence | np.ndarray):
        raise ConfigError(f"must be a list of true/false, got {value!r}", name)
    if len(value) > MAX_LEVELS:
        raise ConfigError(f"must have at most {MAX_LEVELS} entries, got {len(value)}", name)
    bad = [v for v in value if not isinstance(v, bool | np.bool_)]
    if bad:
        raise ConfigError(f"entries must be true or false, got {bad[0]!r}", name)
    return tuple(bool(v) for v in value)


_PAPER = ModelConfig()
_CPU = ModelConfig(
    image_size=64,
    channels=(32, 64, 64, 128),
    attention_levels=(False, False, False, True),
    num_res_blocks=2,
    num_head_channels=16,
    norm_num_groups=16,
)
_TINY = ModelConfig(
    image_size=32,
    channels=(8, 16),
    attention_levels=(False, True),
    num_res_blocks=1,
    num_head_channels=8,
    norm_num_groups=4,
)

PRESETS: dict[str, ModelConfig] = {
    # the reference architecture: encoder attention at 64/32/16 px, decoder at 128/64/32 px, ~72.4M
    "paper": _PAPER.replace(decoder_attention_levels=(True, True, True, False)),
    # the same with the decoder attention mirrored (64/32/16 px both sides), ~75.4M
    "paper-mirrored": _PAPER,
    # trains on a 2-core CPU at 64x64, ~4.6M
    "cpu": _CPU,
    # for tests, 32x32, ~30k
    "tiny": _TINY,
}
for _name in list(PRESETS):
    PRESETS[f"{_name}-baseline"] = PRESETS[_name].replace(conditioned=False)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset (see :data:`PRESETS`), optionally with settings overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


class ConditionedUNet(nn.Module):
    """MONAI ``DiffusionModelUNet`` (2D) predicting ``eps`` from ``cat([x_t, cond])`` and ``t``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=config.in_channels,
            out_channels=config.image_channels,
            num_res_blocks=config.num_res_blocks,
            channels=config.channels,
            attention_levels=config.attention_levels,
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps,
            resblock_updown=config.resblock_updown,
            num_head_channels=config.num_head_channels,
            include_fc=config.include_fc,
            use_combined_linear=config.use_combined_linear,
            use_flash_attention=False,
        )
        if config.decoder_attention_levels is not None:
            self._rebuild_decoder(config)
        self.set_fused_attention(config.use_flash_attention)

    def _rebuild_decoder(self, cfg: ModelConfig) -> None:
        """Replace MONAI's mirrored up-blocks by ones with ``cfg.decoder_attention_levels``."""
        rev_ch = list(reversed(cfg.channels))
        rev_attn = list(reversed(cfg.decoder_attention_levels or cfg.attention_levels))
        blocks = []
        out_ch = rev_ch[0]
        for i in range(len(rev_ch)):
            prev_out, out_ch = out_ch, rev_ch[i]
            blocks.append(
                get_up_block(
                    spatial_dims=2,
                    in_channels=rev_ch[min(i + 1, len(rev_ch) - 1)],
                    prev_output_channel=prev_out,
                    out_channels=out_ch,
                    temb_channels=cfg.channels[0] * 4,
                    num_res_blocks=cfg.num_res_blocks + 1,
                    norm_num_groups=cfg.norm_num_groups,
                    norm_eps=cfg.norm_eps,
                    add_upsample=i != len(rev_ch) - 1,
                    resblock_updown=cfg.resblock_updown,
                    with_attn=rev_attn[i],
                    with_cross_attn=False,
                    num_head_channels=cfg.num_head_channels,
                    transformer_num_layers=1,
                    cross_attention_dim=None,
                    upcast_attention=False,
                    dropout_cattn=0.0,
                    include_fc=cfg.include_fc,
                    use_combined_linear=cfg.use_combined_linear,
                    use_flash_attention=False,
                )
            )
        self.unet.up_blocks = nn.ModuleList(blocks)

    @property
    def conditioned(self) -> bool:
        return self.config.conditioned

    def set_fused_attention(self, enabled: bool) -> None:
        """Switch PyTorch fused attention (``scaled_dot_product_attention``) on or off.

        It is used only where this PyTorch provides it (2.0+, CPU and CUDA alike); the weights
        are the same either way.
        """
        enabled = bool(enabled) and hasattr(torch.nn.functional, "scaled_dot_product_attention")
        for module in self.unet.modules():
            if isinstance(module, SABlock):
                module.use_flash_attention = enabled

    @property
    def fused_attention(self) -> bool:
        """Whether the attention blocks use PyTorch fused attention."""
        return any(m.use_flash_attention for m in self.unet.modules() if isinstance(m, SABlock))

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted noise for ``x_t`` (B, C, H, W) at timesteps ``t`` (scalar or (B,))."""
        if self.config.conditioned:
            if cond is None:
                raise ValueError("this model is conditioned: pass the condition image `cond`")
            if cond.shape != x_t.shape:
                raise ValueError(f"cond shape {tuple(cond.shape)} != x_t shape {tuple(x_t.shape)}")
            x = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
        else:
            if cond is not None:
                raise ValueError("this model is unconditioned: `cond` must be None")
            x = x_t
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.unet(x, t)


def build_model(cfg: ModelConfig | str) -> ConditionedUNet:
    """A freshly initialised network for a config (or preset name)."""
    return ConditionedUNet(get_preset(cfg) if isinstance(cfg, str) else cfg)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those requiring grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
