"""Model presets and the conditioned UNet; device selection."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pseudohealthy.device import (
    DeviceError,
    autocast,
    autocast_dtype,
    available_devices,
    cpu_supports_bf16,
    resolve_device,
)
from pseudohealthy.model.network import (
    PRESETS,
    ConditionedUNet,
    ConfigError,
    ModelConfig,
    build_model,
    count_parameters,
    get_preset,
)


def _meta_model(name: str) -> ConditionedUNet:
    with torch.device("meta"):  # no memory, no initialisation cost
        return build_model(name)


def test_paper_preset_matches_reference_parameter_count() -> None:
    n = count_parameters(_meta_model("paper"))
    n_mirrored = count_parameters(_meta_model("paper-mirrored"))
    print(f"paper: {n / 1e6:.2f}M parameters, paper-mirrored: {n_mirrored / 1e6:.2f}M")
    assert 71.5e6 < n < 73.0e6  # REFERENCE: "about 72M"
    assert n_mirrored - n > 2e6  # 512-channel attention at 16 px costs more than 128-channel at 128 px
    cfg = get_preset("paper")
    assert cfg.channels == (128, 256, 256, 512)
    assert cfg.num_res_blocks == 2 and cfg.num_head_channels == 8 and cfg.norm_num_groups == 32
    assert cfg.image_size == 128 and cfg.in_channels == 2


def test_paper_attention_placement_and_decoder_res_blocks() -> None:
    unet = _meta_model("paper").unet
    # encoder levels 128, 64, 32, 16 px: attention at 64, 32, 16
    assert [hasattr(b, "attentions") for b in unet.down_blocks] == [False, True, True, True]
    # decoder blocks run at 16, 32, 64, 128 px: attention at 32, 64, 128 (the reference's layout)
    assert [hasattr(b, "attentions") for b in unet.up_blocks] == [False, True, True, True]
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3, 3]  # 2 + 1 in the decoder
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 2, 2, 2]
    assert unet.time_embed[0].in_features == 128 and unet.time_embed[0].out_features == 512
    mirrored = _meta_model("paper-mirrored").unet
    assert [hasattr(b, "attentions") for b in mirrored.up_blocks] == [True, True, True, False]


def test_cpu_preset_is_small() -> None:
    n = count_parameters(_meta_model("cpu"))
    assert 1e6 < n < 5e6
    assert get_preset("cpu").image_size == 64


@pytest.mark.parametrize("name", ["tiny", "tiny-baseline"])
def test_forward_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    cfg = model.config
    x = torch.randn(3, 1, cfg.image_size, cfg.image_size)
    cond = torch.randn_like(x) if cfg.conditioned else None
    out = model(x, torch.tensor([0, 500, 999]), cond)
    assert out.shape == x.shape
    assert model.unet.conv_in.conv.in_channels == (2 if cfg.conditioned else 1)
    out_scalar_t = model(x, 500, cond)  # a scalar t is broadcast over the batch
    assert out_scalar_t.shape == x.shape


def test_condition_is_concatenated_after_x_t() -> None:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    x, c = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    seen: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["x"] = inputs[0]

    model.unet.conv_in.register_forward_hook(grab)
    model(x, 10, c)
    assert torch.equal(seen["x"][:, :1], x) and torch.equal(seen["x"][:, 1:], c)


def test_condition_required_or_rejected() -> None:
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="conditioned"):
        build_model("tiny")(x, 1)
    with pytest.raises(ValueError, match="unconditioned"):
        build_model("tiny-baseline")(x, 1, x)
    with pytest.raises(ValueError, match="shape"):
        build_model("tiny")(x, 1, torch.randn(1, 1, 16, 16))


def test_baseline_presets_are_unconditioned_variants() -> None:
    for name in ("paper", "cpu", "tiny"):
        base = get_preset(f"{name}-baseline")
        assert not base.conditioned and base.in_channels == 1
        assert base.replace(conditioned=True) == get_preset(name)


def test_fused_attention_gives_same_output() -> None:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    for p in model.parameters():  # the output conv starts at zero: perturb everything
        p.data.add_(0.05 * torch.randn_like(p))
    x, c = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    assert model.fused_attention  # on by default (config.use_flash_attention)
    with torch.no_grad():
        fused = model(x, 300, c)
        model.set_fused_attention(False)
        assert not model.fused_attention
        plain = model(x, 300, c)
    assert not build_model(get_preset("tiny", use_flash_attention=False)).fused_attention
    assert fused.abs().max() > 0
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)


def test_config_dict_round_trip_through_json() -> None:
    for name, cfg in PRESETS.items():
        back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg, name


def test_config_rejects_unknown_missing_and_inconsistent_settings() -> None:
    d = get_preset("tiny").to_dict()
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**d, "depth": 3})
    assert err.value.field == "depth"
    d_missing = dict(d)
    del d_missing["channels"]
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(d_missing)
    assert err.value.field == "channels"
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**d, "channels": "8,16"})
    assert err.value.field == "channels"
    with pytest.raises(ConfigError) as err:
        get_preset("tiny", channels=(8, 18))  # 18 not divisible by 4 groups
    assert err.value.field == "channels"
    with pytest.raises(ConfigError) as err:
        get_preset("tiny", attention_levels=(True,))
    assert err.value.field == "attention_levels"
    with pytest.raises(ConfigError) as err:
        get_preset("tiny", image_size=33)
    assert err.value.field == "image_size"
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("huge")
    with pytest.raises(ConfigError):
        get_preset("tiny", no_such_setting=1)
    assert get_preset("cpu", image_size=128).image_size == 128


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"attention_levels": ("false", True)}, "attention_levels", "'false'"),
        ({"attention_levels": (0, 1)}, "attention_levels", "true or false"),
        ({"decoder_attention_levels": ("true", "true")}, "decoder_attention_levels", "true or false"),
        ({"channels": ("8", "16")}, "channels", "integers"),
        ({"channels": (8.0, 16)}, "channels", "integers"),
        ({"channels": (True, 16)}, "channels", "integers"),
        ({"channels": (8,) * 9, "attention_levels": (False,) * 9}, "channels", "at most 8"),
        ({"channels": (4096, 4096)}, "channels", "1..2048"),
        ({"num_res_blocks": 9}, "num_res_blocks", "1..8"),
        ({"num_head_channels": 4096}, "num_head_channels", "1..2048"),
        ({"image_channels": 17}, "image_channels", "1..16"),
        ({"image_size": 2048}, "image_size", "..1024"),
        ({"image_size": 8}, "image_size", "16.."),
        ({"norm_eps": 2.0}, "norm_eps", "(0, 1]"),
        ({"conditioned": "false"}, "conditioned", "true or false"),
    ],
)
def test_config_bounds_and_real_booleans(overrides: dict, field: str, message: str) -> None:
    """Sizes are bounded and flags must be real booleans ("false" is not read as True)."""
    with pytest.raises(ConfigError) as err:
        get_preset("tiny", **overrides)
    assert err.value.field == field and message in str(err.value)
    data = {
        **get_preset("tiny").to_dict(),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
    }
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(data)
    assert err.value.field == field


def test_config_accepts_numpy_integers_and_booleans() -> None:
    import numpy as np

    cfg = get_preset("tiny", channels=np.array([8, 16]), attention_levels=np.array([False, True]))
    assert cfg == get_preset("tiny") and all(type(c) is int for c in cfg.channels)
    assert all(type(a) is bool for a in cfg.attention_levels)


def test_schedule_bounds() -> None:
    from pseudohealthy.model.diffusion import MAX_T, Schedule

    assert Schedule(T=MAX_T).T == MAX_T
    for kwargs, field in (
        ({"T": MAX_T + 1}, "T"),
        ({"T": 2e8}, "T"),
        ({"T": 0}, "T"),
        ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start"),
        ({"beta_end": float("nan")}, "beta_end"),
        ({"kind": ["linear"]}, "kind"),
    ):
        with pytest.raises(ConfigError) as err:
            Schedule(**kwargs)
        assert err.value.field == field, kwargs


# ---- device.py -------------------------------------------------------------------------------


def test_resolve_device_cpu_and_auto(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="pseudohealthy.device"):
        dev = resolve_device("auto")
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    else:
        assert dev == torch.device("cpu")
        assert "CPU" in caplog.text


def test_resolve_device_rejects_bad_specs() -> None:
    with pytest.raises(DeviceError):
        resolve_device("cuda:99")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not available"):
            resolve_device("cuda")


def test_available_devices_and_precision() -> None:
    devices = available_devices()
    assert devices[0] == "auto" and devices[-1] == "cpu"
    assert len(devices) == 2 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert autocast_dtype("cpu") is (torch.bfloat16 if cpu_supports_bf16() else None)  # auto
    assert autocast_dtype("cpu", "fp32") is None
    assert autocast_dtype("cpu", "fp16") is torch.float16
    with pytest.raises(DeviceError):
        autocast_dtype("cpu", "fp8")
    with autocast("cpu", "fp32") as dtype:
        assert dtype is None and not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16") as dtype:
        assert dtype is torch.bfloat16 and torch.is_autocast_enabled("cpu")
    if torch.cuda.is_available():
        assert autocast_dtype("cuda:0") in (torch.bfloat16, torch.float16)
