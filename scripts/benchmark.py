"""Benchmark the OSEDiff-form pipeline against the bare diffusers calls (DESIGN.md "Performance targets").

Builds the full-size SD 2.1-base architecture from the bundled configs with random weights (no download) and times a
one-step upscale of a 128² image to 512², stage by stage, through osd_core; then the same VAE encode + U-Net forward +
VAE decode called directly through diffusers. Target: pipeline ≤ 1.05 × bare.

    .venv/bin/python scripts/benchmark.py [--size 128] [--factor 4] [--repeats 2] [--dtype fp32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from osd_core.colorfix import color_fix
from osd_core.imageprep import crop_to_frame, prepare_image, to_unit_range
from osd_core.onestep import one_step_denoise
from osd_core.parameterisation import Parameterisation
from osd_core.schedule import NoiseSchedule
from osd_core.text import encode_prompt
from osd_core.vae import decode_latent, encode_latent

CONFIGS = Path(__file__).resolve().parents[1] / "osd_core" / "configs"


def full_size_sd21(dtype: torch.dtype, device: torch.device):
    """SD 2.1-base U-Net, VAE and text encoder from the bundled configs, random weights."""
    torch.manual_seed(0)
    root = CONFIGS / "sd21-base"
    unet = UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((root / "vae" / "config.json").read_text()))
    text_cfg = json.loads((root / "text_encoder" / "config.json").read_text())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    tokenizer = CLIPTokenizer.from_pretrained(str(CONFIGS / "clip_tokenizer"), local_files_only=True)
    for module in (unet, vae, text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return unet, vae, text_encoder, tokenizer


@contextmanager
def timed(name: str, results: dict):
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    results[name] = results.get(name, 0.0) + time.perf_counter() - start


def run_pipeline(parts, image: torch.Tensor, factor: float) -> dict:
    unet, vae, text_encoder, tokenizer = parts
    times: dict[str, float] = {}
    with torch.inference_mode():
        with timed("prepare", times):
            prepared = prepare_image(image, factor)
        with timed("encode", times):
            z = encode_latent(vae, prepared.x, sampling="sample", seed=0)
        with timed("text", times):
            cond = encode_prompt(text_encoder, tokenizer, "")
        with timed("unet", times):
            z0 = one_step_denoise(unet, NoiseSchedule(), Parameterisation.STANDARD, z, cond, torch.tensor([999.0]))
        with timed("decode", times):
            x = decode_latent(vae, z0)
        with timed("colorfix", times):
            color_fix(to_unit_range(crop_to_frame(x, prepared.frame)), prepared.x_up01, "adain")
    return times


def run_bare(parts, image: torch.Tensor, factor: float) -> dict:
    unet, vae, text_encoder, tokenizer = parts
    param = next(unet.parameters())
    times: dict[str, float] = {}
    size = (round(image.shape[-2] * factor), round(image.shape[-1] * factor))
    x = torch.nn.functional.interpolate(image, size=size, mode="bicubic").clamp(0, 1) * 2 - 1
    x = x.to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        ids = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids.to(param.device)
        cond = text_encoder(ids)[0]
        with timed("encode", times):
            z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        with timed("unet", times):
            eps = unet(z, torch.tensor([999], device=param.device), encoder_hidden_states=cond).sample
            abar = NoiseSchedule().alphas_cumprod[999].item()
            z0 = (z - (1 - abar) ** 0.5 * eps) / abar ** 0.5
        with timed("decode", times):
            vae.decode(z0 / vae.config.scaling_factor).sample.clamp(-1, 1)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="input side in px")
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    parts = full_size_sd21(dtype, device)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    run_pipeline(parts, image, args.factor)  # warm-up
    run_bare(parts, image, args.factor)
    pipe, bare = {}, {}
    for _ in range(args.repeats):
        for name, value in run_pipeline(parts, image, args.factor).items():
            pipe[name] = pipe.get(name, 0.0) + value / args.repeats
        for name, value in run_bare(parts, image, args.factor).items():
            bare[name] = bare.get(name, 0.0) + value / args.repeats
    out = round(args.size * args.factor)
    print(f"{out}x{out} output, {args.dtype} on {device}, mean of {args.repeats} runs (s)")
    for name in ("prepare", "encode", "text", "unet", "decode", "colorfix"):
        print(f"  pipeline {name:9s} {pipe[name]:8.3f}" + (f"   bare {bare[name]:8.3f}" if name in bare else ""))
    core = sum(pipe[k] for k in ("encode", "unet", "decode"))
    total_bare = sum(bare.values())
    print(f"  pipeline encode+unet+decode {core:.3f} s, all stages {sum(pipe.values()):.3f} s; "
          f"bare {total_bare:.3f} s; ratio {core / total_bare:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
