"""Load the SD components offline: a diffusers folder or a single-file checkpoint (DESIGN.md "Offline by design").

* Diffusers folder: ``unet/``, ``vae/``, ``text_encoder/`` (+ optional ``tokenizer/`` and ``scheduler/``).
* Single file (``.safetensors``, ``.ckpt``, ``.pt``) in the original LDM layout. Its configs come from the file's own
  metadata when it carries them (``onestep_sr.config.*``, written by ``save_single_file``), otherwise from the configs
  bundled in ``configs/`` after recognising the architecture from tensor shapes; the tensors are converted with
  diffusers' own single-file converters.
* The CLIP tokenizer comes from the model folder, a given folder, or the bundled one (``configs/clip_tokenizer``).

Everything is read with ``local_files_only``: nothing here can reach the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .ldm_keys import (
    TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, strip_text_prefix, text_to_ldm, unet_to_ldm, vae_to_ldm,
)
from .schedule import NoiseSchedule, ScheduleConfig

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"
META_CONFIG = "onestep_sr.config."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The U-Net context width that identifies SD 2.x in a single file.
_CONTEXT_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"fp32" | "fp16" | "bf16" | "auto" (fp32 on CPU; bf16 where CUDA supports it, else fp16; fp16 on MPS)."""
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise ValueError(f"`dtype` must be one of auto, {', '.join(DTYPES)}; got {name!r}.")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def base_family(unet_config) -> str:
    """"sd2" / "sd1" / "sdxl" for the known U-Net signatures, else "custom-<hash of the architecture>"."""
    cross = unet_config["cross_attention_dim"]
    channels = list(unet_config["block_out_channels"])
    if channels == [320, 640, 1280, 1280] and unet_config["in_channels"] == 4:
        return {1024: "sd2", 768: "sd1"}.get(cross, f"sd-{cross}")
    if channels == [320, 640, 1280] and cross == 2048:
        return "sdxl"
    keys = ("block_out_channels", "cross_attention_dim", "layers_per_block", "in_channels", "out_channels",
            "down_block_types", "up_block_types", "attention_head_dim")
    signature = json.dumps({k: unet_config.get(k) for k in keys}, sort_keys=True, default=list)
    return "custom-" + hashlib.sha256(signature.encode()).hexdigest()[:8]


@dataclass
class SDComponents:
    """The parts of an SD model the one-step pipeline uses, on one device (the CPU after loading)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    family: str
    source: str
    dtype: torch.dtype

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    def to(self, device: torch.device | str) -> SDComponents:
        for module in self.modules():
            module.to(device)
        return self


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast only when needed (diffusers warns on every dtype ``to()`` of some models, even a no-op one)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def _prepare(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return cast(module, dtype).eval().requires_grad_(False)


def load_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer from ``folder``, or the bundled SD 2.x one."""
    return CLIPTokenizer.from_pretrained(str(folder or TOKENIZER_DIR), local_files_only=True)


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"base model {str(path)!r} does not exist. Put an SD 2.1-base checkpoint in ComfyUI's models/checkpoints "
        "(single file) or models/diffusers (folder) and select it in the Load model node."
    )


def load_sd_components(
    path: str | Path, *, dtype: torch.dtype = torch.float32, tokenizer_dir: str | Path | None = None
) -> SDComponents:
    """Load a diffusers folder or a single-file checkpoint on the CPU in ``dtype``."""
    path = Path(path)
    if not path.exists():
        raise _missing(path)
    if path.is_dir():
        return _load_diffusers_folder(path, dtype, tokenizer_dir)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"base model {str(path)!r} is neither a diffusers folder nor a checkpoint file "
            f"({', '.join(SINGLE_FILE_SUFFIXES)})."
        )
    return _load_single_file(path, dtype, tokenizer_dir)


def _load_diffusers_folder(path: Path, dtype: torch.dtype, tokenizer_dir) -> SDComponents:
    for part in ("unet", "vae", "text_encoder"):
        if not (path / part / "config.json").is_file():
            raise ValueError(
                f"{str(path)!r} is not a diffusers model folder: {part}/config.json is missing "
                "(expected unet/, vae/ and text_encoder/ subfolders)."
            )
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True)
    vae = AutoencoderKL.from_pretrained(str(path / "vae"), local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(str(path / "text_encoder"), local_files_only=True)
    tok_dir = path / "tokenizer" if (path / "tokenizer" / "vocab.json").is_file() else tokenizer_dir
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    config = ScheduleConfig.from_diffusers(json.loads(scheduler_file.read_text())) if scheduler_file.is_file() \
        else ScheduleConfig()
    return SDComponents(
        unet=_prepare(unet, dtype), vae=_prepare(vae, dtype), text_encoder=_prepare(text_encoder, dtype),
        tokenizer=load_tokenizer(tok_dir), schedule=NoiseSchedule(config), family=base_family(unet.config),
        source=str(path), dtype=dtype,
    )


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a checkpoint file; refuses corrupt files and pickles with code in them."""
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{str(path)!r} is not a valid safetensors file ({err}); it is probably truncated or corrupt. "
                "Re-download or re-export it."
            ) from err
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for bad pickles
        raise ValueError(
            f"{str(path)!r} could not be read as a weights-only checkpoint ({type(err).__name__}: {err}). "
            "Re-download it, or convert it to .safetensors."
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if torch.is_tensor(v)}, {}


def _bundled_configs(state: dict[str, torch.Tensor], path: Path) -> dict[str, dict]:
    if _CONTEXT_KEY not in state:
        raise ValueError(
            f"{str(path)!r} is not an SD checkpoint in the original (LDM) layout; first keys: "
            f"{sorted(state)[:5]}. Tried: onestep_sr metadata configs, SD 2.x LDM layout. Use a diffusers folder "
            "or an SD 2.1-base single file."
        )
    context = state[_CONTEXT_KEY].shape[1]
    if context != 1024:
        raise ValueError(
            f"{str(path)!r} is an SD checkpoint with a {context}-wide text context (SD 1.x has 768); one-step SR "
            "here needs an SD 2.x model such as SD 2.1-base or SD-Turbo."
        )
    root = CONFIG_DIR / "sd21-base"
    return {part: json.loads((root / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder")}


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{str(path)!r}: the {what} weights are incomplete; missing {missing[:5]} "
                         f"({len(missing)} in all). The file is not a complete SD 2.x checkpoint.")
    module.load_state_dict({k: state[k] for k in own}, strict=True, assign=True)


def _load_single_file(path: Path, dtype: torch.dtype, tokenizer_dir) -> SDComponents:
    state, metadata = read_checkpoint(path)
    if META_CONFIG + "unet" in metadata:
        configs = {part: json.loads(metadata[META_CONFIG + part]) for part in ("unet", "vae", "text_encoder")}
    else:
        configs = _bundled_configs(state, path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    _load_strict(unet, single_file_utils.convert_ldm_unet_checkpoint(state, dict(unet.config)), "U-Net", path)
    _load_strict(vae, single_file_utils.convert_ldm_vae_checkpoint(state, dict(vae.config)), "VAE", path)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    converted = single_file_utils.convert_open_clip_checkpoint(text_encoder, state, prefix=TEXT_PREFIX)
    prefixed = next(iter(text_encoder.state_dict())).startswith("text_model.")
    converted = {("text_model." if prefixed else "") + strip_text_prefix(k): v for k, v in converted.items()}
    _load_strict(text_encoder, converted, "text encoder", path)
    return SDComponents(
        unet=_prepare(unet, dtype), vae=_prepare(vae, dtype), text_encoder=_prepare(text_encoder, dtype),
        tokenizer=load_tokenizer(tokenizer_dir), schedule=NoiseSchedule(), family=base_family(unet.config),
        source=str(path), dtype=dtype,
    )


def save_single_file(components: SDComponents, path: str | Path, *, extra_metadata: dict[str, str] | None = None) -> None:
    """Write U-Net, VAE and text encoder as one LDM-layout safetensors file, with their configs in the metadata."""
    unet_cfg, vae_cfg = dict(components.unet.config), dict(components.vae.config)
    state = {
        **unet_to_ldm(components.unet.state_dict(), unet_cfg),
        **vae_to_ldm(components.vae.state_dict(), vae_cfg),
        **text_to_ldm(components.text_encoder.state_dict()),
    }
    metadata = {
        META_CONFIG + "unet": json.dumps(unet_cfg, default=list),
        META_CONFIG + "vae": json.dumps(vae_cfg, default=list),
        META_CONFIG + "text_encoder": components.text_encoder.config.to_json_string(use_diff=False),
        **(extra_metadata or {}),
    }
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)) for k in state)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
