"""Diffusers → original LDM ("single-file") state-dict layout for SD 2.x components.

Loading single files goes the other way through diffusers' own converters (``models.load_sd_components``); this
module is the inverse, used to *write* single-file checkpoints (the demo models, and tests of the single-file path).

Layout of the original checkpoints (the CompVis/Stability LDM code):

* U-Net under ``model.diffusion_model.``: ``input_blocks.{n}`` with n = (L+1)·i + j + 1 for resnet/attention j of down
  block i and n = (L+1)·(i+1) for its downsampler (L = layers_per_block); ``middle_block.{0,1,2}``;
  ``output_blocks.{(L+1)·i + j}`` for up block i (L+1 resnets) with the upsampler last in block j = L. Resnets name
  their parts in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection.
* VAE under ``first_stage_model.``: ``encoder.down.{i}.block.{j}``, ``decoder.up.{n-1-i}.block.{j}`` (reversed),
  ``mid.block_{1,2}``, ``mid.attn_1`` with 1×1-conv q/k/v/proj_out, ``nin_shortcut``, ``norm_out``.
* Text encoder (OpenCLIP ViT-H) under ``cond_stage_model.model.``: ``transformer.resblocks.{k}`` with fused
  ``attn.in_proj_weight`` (q; k; v), ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``; ``ln_final``, ``token_embedding``,
  ``positional_embedding`` and ``text_projection`` (transposed).
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
_TEXT_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
               ("self_attn.out_proj", "attn.out_proj")]


def _module_map(config: dict) -> dict[str, str]:
    """Diffusers U-Net module path -> LDM module path, from the U-Net config."""
    layers = config["layers_per_block"]
    n_blocks = len(config["block_out_channels"])
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    mapping = dict(_UNET_TOP)
    for i in range(n_blocks):
        for j in range(layers):
            n = (layers + 1) * i + j + 1
            mapping[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if down_attn[i]:
                mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < n_blocks - 1:
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op"
        for j in range(layers + 1):
            n = (layers + 1) * i + j
            mapping[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            if up_attn[i]:
                mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
        if i < n_blocks - 1:
            position = 2 if up_attn[i] else 1
            mapping[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{(layers + 1) * i + layers}.{position}.conv"
    mapping.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                    "mid_block.resnets.1": "middle_block.2"})
    return mapping


def _rename(key: str, modules: dict[str, str], inner: list[tuple[str, str]]) -> str:
    """Rename the longest matching module prefix of ``key``, then the resnet-internal names after it."""
    for prefix in sorted(modules, key=len, reverse=True):
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1:]
            if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
                for new, old in inner:
                    if rest.startswith(new + "."):
                        rest = old + rest[len(new):]
                        break
            return f"{modules[prefix]}.{rest}"
    raise KeyError(f"no LDM name for U-Net parameter {key!r}")


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*``."""
    modules = _module_map(config)
    return {UNET_PREFIX + _rename(k, modules, _UNET_RESNET): v for k, v in state.items()}


def _vae_name(key: str, n_blocks: int) -> str:
    parts = key.split(".")
    side = parts[0]  # encoder | decoder | quant_conv | post_quant_conv
    if side not in ("encoder", "decoder"):
        return key
    rest = ".".join(parts[1:])
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.'):]}"
    if rest.startswith(("down_blocks.", "up_blocks.")):
        kind, i, sub = parts[1], int(parts[2]), ".".join(parts[3:])
        ldm_i, ldm_kind = (i, "down") if kind == "down_blocks" else (n_blocks - 1 - i, "up")
        sub = sub.replace("resnets.", "block.", 1)
        sub = sub.replace("downsamplers.0.", "downsample.", 1).replace("upsamplers.0.", "upsample.", 1)
        return f"{side}.{ldm_kind}.{ldm_i}.{sub}".replace("conv_shortcut", "nin_shortcut")
    if rest.startswith("mid_block.resnets."):
        j = int(parts[3])
        return f"{side}.mid.block_{j + 1}.{'.'.join(parts[4:])}".replace("conv_shortcut", "nin_shortcut")
    if rest.startswith("mid_block.attentions.0."):
        sub = ".".join(parts[4:])
        for new, old in _VAE_ATTN:
            if sub.startswith(new + "."):
                return f"{side}.mid.attn_1.{old}{sub[len(new):]}"
    return key


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict -> ``first_stage_model.*`` (attention as 1×1 convs)."""
    n_blocks = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        name = _vae_name(key, n_blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (C, C) -> 1×1 conv (C, C, 1, 1)
        out[VAE_PREFIX + name] = value
    return out


def strip_text_prefix(key: str) -> str:
    """CLIPTextModel keys carry a ``text_model.`` prefix in transformers 4 and none in transformers 5."""
    return key.removeprefix("text_model.")


def text_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers CLIPTextModel(WithProjection) state dict -> OpenCLIP ``cond_stage_model.model.*``."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    tops = {"embeddings.token_embedding.weight": "token_embedding.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "final_layer_norm.weight": "ln_final.weight",
            "final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        key = strip_text_prefix(key)
        if key in tops:
            out[TEXT_PREFIX + tops[key]] = value
        elif key == "text_projection.weight":
            out[TEXT_PREFIX + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            k, sub = key[len("encoder.layers."):].split(".", 1)
            block = f"transformer.resblocks.{k}."
            for proj in ("q_proj", "k_proj", "v_proj"):
                if sub.startswith(f"self_attn.{proj}."):
                    fused.setdefault(f"{block}attn.in_proj_{sub.rsplit('.', 1)[1]}", {})[proj] = value
                    break
            else:
                for new, old in _TEXT_LAYER:
                    if sub.startswith(new + "."):
                        out[TEXT_PREFIX + block + old + sub[len(new):]] = value
                        break
    for name, parts in fused.items():
        out[TEXT_PREFIX + name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out
