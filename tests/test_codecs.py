"""Codecs: exact pixel round trip; the VAE codecs normalise exactly as diffusers' pipelines do."""

import pytest
import torch

from dit_distillery import tiny
from dit_distillery.codecs import Flux2VAECodec, PixelCodec, QwenImageVAECodec, codec_for_vae, module_fingerprint
from dit_distillery.errors import DistilleryError


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 48, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def qwen_vae():
    return tiny.tiny_qwen_image_vae()


@pytest.fixture(scope="module")
def flux2_vae():
    return tiny.tiny_flux2_vae()


def test_pixel_codec_is_lossless(images):
    codec = PixelCodec(4)
    latents = codec.encode(images)
    assert latents.shape == (2, 48, 8, 12) and codec.latent_channels == 48 and codec.spatial_factor == 4
    assert torch.equal(codec.decode(latents), images)
    # space-to-depth: channel c*16 + dy*4 + dx of latent (i, j) is pixel (4i + dy, 4j + dx) of colour c
    assert latents[1, 2 * 16 + 1 * 4 + 3, 5, 7] == images[1, 2, 4 * 5 + 1, 4 * 7 + 3]
    assert codec.identity == "pixel:p4" and PixelCodec(2).identity == "pixel:p2"


def test_pixel_codec_rejects_bad_input(images):
    codec = PixelCodec(4)
    with pytest.raises(DistilleryError):
        codec.encode(images[:, :, :30])
    with pytest.raises(DistilleryError):
        codec.encode(images[:, :2])
    with pytest.raises(DistilleryError):
        codec.decode(torch.zeros(1, 12, 4, 4))
    with pytest.raises(DistilleryError):
        PixelCodec(0)


def test_qwen_image_codec_normalises_like_diffusers(images, qwen_vae):
    codec = QwenImageVAECodec(qwen_vae)
    assert (codec.latent_channels, codec.spatial_factor) == (16, 8)
    with torch.no_grad():
        latents = codec.encode(images)
        # diffusers' QwenImageImg2ImgPipeline._encode_vae_image with argmax sampling
        raw = qwen_vae.encode(images[:, :, None]).latent_dist.mode()
        mean = torch.tensor(qwen_vae.config.latents_mean).view(1, 16, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(qwen_vae.config.latents_std).view(1, 16, 1, 1, 1)
        assert latents.shape == (2, 16, 4, 6)
        assert torch.equal(latents, ((raw - mean) * inv_std)[:, :, 0])
        assert torch.equal(codec.encode(images), latents)  # deterministic: the posterior mean
        # diffusers' QwenImagePipeline decode: latents / (1/std) + mean, then the first frame
        expected = qwen_vae.decode(latents[:, :, None] / inv_std + mean).sample[:, :, 0]
        assert torch.equal(codec.decode(latents), expected)


def test_flux2_codec_patchifies_and_normalises_like_diffusers(images, flux2_vae):
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    codec = Flux2VAECodec(flux2_vae)
    assert (codec.latent_channels, codec.spatial_factor) == (128, 16)
    bn = flux2_vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + flux2_vae.config.batch_norm_eps)
    assert not torch.allclose(mean, torch.zeros_like(mean))  # the tiny VAE has non-trivial stats to test with
    with torch.no_grad():
        latents = codec.encode(images)
        raw = flux2_vae.encode(images).latent_dist.mode()
        assert latents.shape == (2, 128, 2, 3)
        assert torch.allclose(latents, (Flux2Pipeline._patchify_latents(raw) - mean) / std, atol=1e-6)
        expected = flux2_vae.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean)).sample
        assert torch.allclose(codec.decode(latents), expected, atol=1e-6)


def test_vae_codecs_work_under_grad(images, flux2_vae, qwen_vae):
    for codec in (Flux2VAECodec(flux2_vae), QwenImageVAECodec(qwen_vae), PixelCodec(4)):
        x = images.clone().requires_grad_(True)
        codec.decode(codec.encode(x)).square().mean().backward()
        assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_identity_follows_the_weights(flux2_vae, qwen_vae):
    a, b = Flux2VAECodec(flux2_vae), Flux2VAECodec(tiny.tiny_flux2_vae())
    assert a.identity == b.identity and a.identity.startswith("flux2_vae:")
    other = tiny.tiny_flux2_vae(seed=1)
    assert Flux2VAECodec(other).identity != a.identity
    assert QwenImageVAECodec(qwen_vae).identity != a.identity
    assert QwenImageVAECodec(qwen_vae, identity="qwen_image_vae:file").identity == "qwen_image_vae:file"
    assert module_fingerprint(flux2_vae) == module_fingerprint(tiny.tiny_flux2_vae())


def test_codec_for_vae(flux2_vae, qwen_vae):
    assert isinstance(codec_for_vae(flux2_vae), Flux2VAECodec)
    assert isinstance(codec_for_vae(qwen_vae), QwenImageVAECodec)
    with pytest.raises(DistilleryError):
        codec_for_vae(torch.nn.Linear(2, 2))
