"""The values flowing between nodes: batch broadcasting and missing-module messages."""

import pytest
import torch

from osd_core.datatypes import OSDCond, OSDLatent, OSDModel, OSDNoise, OSDTimestep
from osd_core.imageprep import prepare_image
from osd_core.parameterisation import Parameterisation


def test_batch_one_broadcasts_and_mismatch_is_explained():
    assert OSDTimestep(torch.tensor([999.0])).for_batch(3).shape == (3,)
    assert OSDCond(torch.zeros(1, 77, 8), "text").for_batch(2).shape == (2, 77, 8)
    with pytest.raises(ValueError, match="timestep` has batch size 2 but the image batch has 3"):
        OSDTimestep(torch.tensor([1.0, 2.0])).for_batch(3)


def test_noise_must_match_the_latent():
    latent = OSDLatent(z=torch.zeros(1, 4, 8, 8), image=prepare_image(torch.rand(1, 3, 16, 16), 4.0))
    assert OSDNoise(torch.zeros(1, 4, 8, 8), "gaussian").for_latent(latent).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="same image and upscale factor"):
        OSDNoise(torch.zeros(1, 4, 6, 8), "gaussian").for_latent(latent)


def test_missing_module_names_bundle_module_and_provider():
    model = OSDModel(components=None, bundle=None, parameterisation=Parameterisation.STANDARD, defaults={},
                     name="base")
    with pytest.raises(ValueError, match=r"MINE estimate needs the `mine` module.*none \(plain SD\).*IDaS-SR bundle"):
        model.require_module("mine", needed_by="MINE estimate")
