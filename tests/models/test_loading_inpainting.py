"""Inpainting checkpoints (9-channel UNet) in both published layouts load as the inpainting preset."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pidrt.errors import FormatError  # noqa: E402
from pidrt.models.build import build_random  # noqa: E402
from pidrt.models.loading import LDM_CONV_IN, load_models  # noqa: E402
from pidrt.models.presets import (  # noqa: E402
    SD15, SD15_INPAINTING, TINY, TINY_INPAINTING, for_unet_channels, get_preset,
)

try:
    from .ldm_layout import to_ldm  # noqa: E402
    from .test_loading import write_tokenizer  # noqa: E402
except ImportError:
    from ldm_layout import to_ldm  # noqa: E402
    from test_loading import write_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def ref():
    return build_random(TINY_INPAINTING, seed=5)


def same_unet(a, b) -> None:
    """The weights bit for bit; the outputs within 1e-5 (two modules may take other kernel paths,
    e.g. attention processors or memory layouts, so their float sums need not agree bit for bit)."""
    wa, wb = a.unet.state_dict(), b.unet.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(2, 9, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(a.unet(sample, 10, encoder_hidden_states=ctx).sample,
                                   b.unet(sample, 10, encoder_hidden_states=ctx).sample, rtol=0, atol=1e-5)


def test_published_config():
    """runwayml/stable-diffusion-inpainting's unet/config.json: SD1.5's with in_channels 9."""
    assert SD15_INPAINTING.unet.in_channels == 9 and SD15_INPAINTING.unet.out_channels == 4
    assert SD15_INPAINTING.unet.diffusers_kwargs() == {**SD15.unet.diffusers_kwargs(), "in_channels": 9}
    same = ("text", "vae", "scheduler", "resolution")
    assert all(getattr(SD15_INPAINTING, k) == getattr(SD15, k) for k in same)
    assert get_preset("tiny-inpainting") is TINY_INPAINTING and TINY_INPAINTING.family == "tiny"
    assert for_unet_channels(SD15, 9) == SD15_INPAINTING and for_unet_channels(SD15_INPAINTING, 4) is SD15
    assert for_unet_channels(TINY, 7) is TINY  # no such variant: the config check reports it


def test_diffusers_folder_is_recognised(ref, tmp_path):
    root = tmp_path / "sd-inpainting"
    ref.unet.save_pretrained(root / "unet")
    ref.text_encoder.save_pretrained(root / "text_encoder")
    ref.vae.save_pretrained(root / "vae")
    write_tokenizer(root / "tokenizer")
    loaded = load_models(root, TINY)  # the base preset: the file's in_channels selects the twin
    assert loaded.preset is TINY_INPAINTING and loaded.unet.config.in_channels == 9
    same_unet(ref, loaded)


def test_single_file_is_recognised(ref, tmp_path):
    state = to_ldm(ref.unet, ref.text_encoder, ref.vae, TINY_INPAINTING)
    assert state[LDM_CONV_IN].shape == (32, 9, 3, 3)  # sd15: [320, 9, 3, 3]
    file = tmp_path / "tiny-inpainting.safetensors"
    save_file(state, str(file))
    loaded = load_models(file, TINY)
    assert loaded.preset is TINY_INPAINTING
    same_unet(ref, loaded)
    # Any other channel count is no preset's: reported as the architecture mismatch it is.
    state[LDM_CONV_IN] = torch.zeros(32, 7, 3, 3)
    save_file(state, str(file))
    with pytest.raises(FormatError, match="wrong shape"):
        load_models(file, TINY)
