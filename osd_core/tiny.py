"""Tiny SD-shaped components built in code, for tests and the demo models (no download, tens of ms per forward).

The U-Net keeps SD 2.x's block layout (three cross-attention down blocks and a plain one, mirrored up, linear
projections), the VAE its ×8 downscale with four levels, the text encoder CLIP's 77-token interface with the real
49,408-entry vocabulary of the bundled tokenizer; only the widths and depths are small. Random weights, seeded.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .models import (
    BUNDLED_SD2,
    CONFIG_DIR,
    SDComponents,
    base_family,
    cast,
    load_tokenizer,
)
from .method_defaults import METHOD_DEFAULTS
from .schedule import NoiseSchedule

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
    norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64, scaling_factor=0.18215,
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
    max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
    pad_token_id=0,
)


def tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> SDComponents:
    """Random tiny U-Net, VAE and text encoder (seeded) with the bundled tokenizer and the SD 2.1-base schedule.

    The same seed gives bit-identical weights; the caller's global RNG state is left as it was.
    """
    # diffusers/transformers constructors draw their initial weights from the global RNG, so seed it inside a fork
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    for module in (unet, vae, text_encoder):
        cast(module, dtype).eval().requires_grad_(False)
    return SDComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), schedule=NoiseSchedule(),
        family=base_family(unet.config), source="tiny", dtype=dtype,
    )


def save_tiny_diffusers(folder: str | Path, seed: int = 0) -> SDComponents:
    """Write tiny components as a complete diffusers model folder (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/ with SD 2.1-base's betas, model_index.json); returns the components written."""
    folder = Path(folder)
    components = tiny_components(seed)
    components.unet.save_pretrained(str(folder / "unet"))
    components.vae.save_pretrained(str(folder / "vae"))
    components.text_encoder.save_pretrained(str(folder / "text_encoder"))
    components.tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CONFIG_DIR / BUNDLED_SD2 / "scheduler" / "scheduler_config.json",
                    folder / "scheduler" / "scheduler_config.json")
    shutil.copyfile(CONFIG_DIR / BUNDLED_SD2 / "model_index.json", folder / "model_index.json")
    return components


# Per method: the tiny configs of its modules (SPEC §3–6).
TINY_MODULES = {
    "osediff": {},
    "idas": {"mine": dict(hidden_size=32, depth=2, num_heads=4, num_queries=4, cond_dim=32)},
    "codsr": {"lqfm": dict(hidden=32, out_channels=32)},
    # RCOD reads ComfyUI's native CLIP vision tower, which only loads at full ViT-L/14 width (1024).
    "rcod": {"vpim": dict(vision_dim=1024, cond_dim=32), "mem": dict(token_dim=1024, hidden=(32, 16))},
    "tadsr": {"tae": dict(time_proj_channels=32, temb_channels=64)},
    # PiSA-SR's two U-Net LoRA sets (pixel merged, semantic live) are LoRA components, not modules: see tiny_bundle.
    "pisa-sr": {},
}
# Per method: x̂₀ parameterisation, inference defaults (``method_defaults``) and the tiny module configs.
TINY_METHODS = {method: (*METHOD_DEFAULTS[method], modules) for method, modules in TINY_MODULES.items()}
# Methods whose U-Net carries a second, live LoRA set (bundle component "unet_sem"), and its adapter-name suffixes.
DUAL_LORA = {"pisa-sr": ("_pix", "_sem")}


def _perturb_zeros(module: torch.nn.Module, generator: torch.Generator, std: float) -> None:
    """Give zero-initialised tensors (identity-at-start heads) small random values, so a demo module does
    something visible."""
    with torch.no_grad():
        for param in module.parameters():
            if not bool(param.any()):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def tiny_bundle(
    components: SDComponents | None = None, *, method: str = "osediff", rank: int = 4, seed: int = 0,
    lora_std: float = 0.05,
):
    """A bundle (meta, tensors) for tiny components (``tiny_components(seed)`` when none are given; those given are
    not modified): OSEDiff-layout LoRA (U-Net in three adapters, VAE encoder), the full conv_in, and the method's
    modules, with random non-zero LoRA B matrices, conv_in offsets and heads (std ``lora_std``) so the bundle visibly
    changes the output. PiSA-SR's U-Net LoRA comes twice, as ``default_*_pix`` (``unet``) and ``default_*_sem``
    (``unet_sem``, kept live for the λ control), both of rank ``rank``."""
    from .adapters import collect_bundle_tensors, inject_bundle_lora
    from .bundle import BundleMeta
    from .lora import PEFT_DEFAULT_ALPHA, unet_lora_targets, vae_encoder_lora_targets
    from .method_modules import REGISTRY, build_module, bundle_tensors

    if method not in TINY_METHODS:
        raise ValueError(f"`method` must be one of {sorted(TINY_METHODS)}; got {method!r}.")
    parameterisation, defaults, module_configs = TINY_METHODS[method]
    components = tiny_components(seed) if components is None else copy.deepcopy(components)
    unet_targets = unet_lora_targets(components.unet)
    pix, sem = DUAL_LORA.get(method, ("", None))
    lora = {
        "unet": {"rank": rank, "alpha": PEFT_DEFAULT_ALPHA,
                 "adapters": {name + pix: targets for name, targets in unet_targets.items()}},
        "vae_encoder": {"rank": rank, "alpha": PEFT_DEFAULT_ALPHA,
                        "adapters": {"default_encoder": vae_encoder_lora_targets(components.vae)}},
    }
    if sem is not None:
        lora["unet_sem"] = {"rank": rank, "alpha": PEFT_DEFAULT_ALPHA,
                            "adapters": {name + sem: targets for name, targets in unet_targets.items()}}
    configs = {name: REGISTRY[name].config_class(**values) for name, values in module_configs.items()}
    meta = BundleMeta(
        method=method, base_family=components.family, parameterisation=parameterisation, lora=lora,
        modules=("unet_lora", "vae_encoder_lora", "unet_conv_in", *(["unet_sem_lora"] if sem else []), *configs),
        hyperparameters={name: config.to_dict() for name, config in configs.items()}, defaults=defaults,
        extra={"demo": "random weights: this bundle does not upscale anything"},
    )
    inject_bundle_lora(components, lora)
    generator = torch.Generator().manual_seed(seed + 1)
    tensors = collect_bundle_tensors(components, meta)
    for key, value in tensors.items():
        if ".lora_A." in key:  # peft's gaussian init (std 1/r) draws from the global RNG; redraw it seeded
            tensors[key] = torch.randn(value.shape, generator=generator) / rank
        elif ".lora_B." in key:
            tensors[key] = torch.randn(value.shape, generator=generator) * lora_std
        elif key.startswith("unet_conv_in."):  # a trained conv_in differs from the base one; make that visible
            tensors[key] = value + torch.randn(value.shape, generator=generator).to(value.dtype) * lora_std
    for name, config in configs.items():
        module = build_module(name, config, components)
        _perturb_zeros(module, generator, lora_std)
        tensors.update({f"{name}.{k}": v for k, v in bundle_tensors(name, module).items()})
    return meta, tensors
