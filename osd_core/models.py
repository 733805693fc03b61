"""Load the SD components offline: a diffusers folder or a single-file checkpoint (DESIGN.md "Offline by design").

* Diffusers folder: ``unet/``, ``vae/``, ``text_encoder/`` (+ optional ``tokenizer/`` and ``scheduler/``).
* Single file (``.safetensors``, ``.ckpt``, ``.pt``) in the original LDM layout (``model.diffusion_model.*``,
  ``first_stage_model.*``, OpenCLIP under ``cond_stage_model.model.*`` or, from Stability's sgm code as in SD-Turbo,
  ``conditioner.embedders.0.model.*``). Its configs come from the file's own metadata when it carries them
  (``onestep_sr.config.*``, written by ``save_single_file``), otherwise from the configs bundled in ``configs/``
  after recognising the architecture from tensor shapes; the tensors are converted with diffusers' own single-file
  converters. Pickled checkpoints are read weights-only.
* The CLIP tokenizer comes from the model folder, a given folder, or the bundled one (``configs/clip_tokenizer``).

Everything is read with ``local_files_only``: nothing here can reach the network.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .ldm_keys import (
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    strip_text_prefix,
    text_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from .schedule import NoiseSchedule, ScheduleConfig

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"
META_CONFIG = "onestep_sr.config."
# Single files without config metadata are read with these bundled configs (SD-Turbo shares them).
BUNDLED_SD2 = "sd21-base"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# OpenCLIP text-tower prefixes of SD 2.x single files: the original LDM layout, and Stability's sgm layout.
TEXT_PREFIXES = (TEXT_PREFIX, "conditioner.embedders.0.model.")
# Byte alignment of PyTorch's own CPU allocations.
_ALIGNMENT = 64
# The U-Net config fields that fix the shapes of its weights (what ``base_family`` hashes for unknown models).
_ARCHITECTURE_KEYS = ("block_out_channels", "cross_attention_dim", "layers_per_block", "in_channels", "out_channels",
                      "down_block_types", "up_block_types", "attention_head_dim", "norm_num_groups",
                      "use_linear_projection", "transformer_layers_per_block")
# The U-Net context width that identifies SD 2.x in a single file.
_CONTEXT_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"fp32" | "fp16" | "bf16" | "auto" (fp32 on CPU; bf16 where CUDA supports it, else fp16; fp16 on MPS)."""
    device = torch.device(device)
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
    """The base-model family a U-Net config belongs to; adapter bundles are made for one family.

    "sd2" (SD 2.x, SD-Turbo: context 1024), "sd1" (context 768) and "sdxl" for the published signatures; any other
    U-Net gets "custom-<8 hex digits>", a hash of the fields that define its architecture, so two tiny test models
    of the same shape share a family and a differently shaped one does not.
    """
    cross = unet_config.get("cross_attention_dim")
    channels = list(unet_config.get("block_out_channels") or ())
    in_channels = unet_config.get("in_channels")
    if channels == [320, 640, 1280, 1280] and in_channels == 4 and cross in (1024, 768):
        return "sd2" if cross == 1024 else "sd1"
    if channels == [320, 640, 1280] and in_channels == 4 and cross == 2048:
        return "sdxl"
    signature = json.dumps({k: unet_config.get(k) for k in _ARCHITECTURE_KEYS}, sort_keys=True, default=list)
    return "custom-" + hashlib.sha256(signature.encode()).hexdigest()[:8]


@dataclass
class SDComponents:
    """The parts of an SD model the one-step pipeline uses, on one device (the CPU after loading).

    ``family`` is ``base_family(unet.config)`` (what adapter bundles are checked against), ``source`` the path the
    components were loaded from ("tiny" for test models), ``dtype`` the dtype of every weight.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    family: str
    source: str
    dtype: torch.dtype

    def modules(self) -> list[torch.nn.Module]:
        """The U-Net, VAE and text encoder."""
        return [self.unet, self.vae, self.text_encoder]

    def to(self, device: torch.device | str) -> SDComponents:
        """Move every module to ``device`` in place (dtype unchanged); returns self."""
        for module in self.modules():
            module.to(device)
        return self


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast only when needed (diffusers warns on every dtype ``to()`` of some models, even a no-op one)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def _own_aligned_memory(module: torch.nn.Module) -> None:
    """Copy weights that sit at unaligned addresses (views into a memory-mapped safetensors file) into fresh
    allocations: CPU kernels take other, slower code paths on unaligned data, which also changes results in the
    last bit, so a loaded model would not reproduce the model that was saved."""
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.data_ptr() % _ALIGNMENT:
                tensor.data = tensor.data.clone()


def _prepare(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    cast(module, dtype).eval().requires_grad_(False)
    _own_aligned_memory(module)
    return module


def load_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer from ``folder``, or the bundled SD 2.x one (pad "!" = id 0, 77 tokens)."""
    return CLIPTokenizer.from_pretrained(str(folder or TOKENIZER_DIR), local_files_only=True)


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"base model {str(path)!r} does not exist. Put an SD 2.1-base checkpoint in ComfyUI's models/checkpoints "
        "(single file) or models/diffusers (folder) and select it in the Load model node."
    )


def load_sd_components(
    path: str | Path, *, dtype: torch.dtype = torch.float32, tokenizer_dir: str | Path | None = None
) -> SDComponents:
    """Load a diffusers folder or a single-file checkpoint on the CPU in ``dtype``, eval mode, no gradients.

    ``tokenizer_dir`` is used when the model itself carries no tokenizer (single files never do); without it the
    bundled SD 2.x tokenizer is used. Nothing is downloaded.
    """
    path = Path(path)
    if not path.exists():
        raise _missing(path)
    if path.is_dir():
        return _load_diffusers_folder(path, dtype, tokenizer_dir)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"base model {str(path)!r} is neither a diffusers folder nor a checkpoint file "
            f"({', '.join(SINGLE_FILE_SUFFIXES)}). Select an SD 2.1-base .safetensors file or a diffusers folder."
        )
    return _load_single_file(path, dtype, tokenizer_dir)


def _schedule_from_file(path: Path) -> NoiseSchedule:
    """The DDPM schedule of a ``scheduler_config.json``, or SD 2.1-base's when the file is absent."""
    if not path.is_file():
        return NoiseSchedule(ScheduleConfig())
    return NoiseSchedule(ScheduleConfig.from_diffusers(json.loads(path.read_text())))


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
    return SDComponents(
        unet=_prepare(unet, dtype), vae=_prepare(vae, dtype), text_encoder=_prepare(text_encoder, dtype),
        tokenizer=load_tokenizer(tok_dir), schedule=_schedule_from_file(path / "scheduler" / "scheduler_config.json"),
        family=base_family(unet.config), source=str(path), dtype=dtype,
    )


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a checkpoint file; refuses corrupt files and pickles with code in them.

    ``.ckpt``/``.pt``/``.pth`` are read with ``weights_only=True`` and unwrapped from a ``state_dict`` key.
    """
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
                return tensors, dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{str(path)!r} is not a valid safetensors file ({err}); it is probably truncated or corrupt. "
                "Re-download or re-export it."
            ) from err
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many unrelated types for bad or unsafe pickles
        raise ValueError(
            f"{str(path)!r} could not be read as a weights-only checkpoint ({type(err).__name__}: {err}). "
            "Re-download it, or convert it to .safetensors."
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors.")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}, {}


def _unrecognised(state: dict[str, torch.Tensor], path: Path) -> ValueError:
    keys = sorted(state)
    hint = ""
    if any(k.startswith(("down_blocks.", "unet.", "encoder.down_blocks.")) for k in keys):
        hint = " The keys look like a diffusers model: load its diffusers folder instead."
    return ValueError(
        f"{str(path)!r} is not an SD checkpoint in a layout this pack reads; first keys: {keys[:5]} "
        f"({len(keys)} in all). Layouts tried: OneStep SR single file (configs in the '{META_CONFIG}*' metadata), "
        f"original LDM layout of SD 2.x ('{_CONTEXT_KEY}').{hint} Use an SD 2.1-base single file or a diffusers "
        "folder."
    )


def _bundled_configs(state: dict[str, torch.Tensor], path: Path) -> dict[str, dict]:
    """The bundled SD 2.1-base configs, after checking from the tensor shapes that the file is an SD 2.x model."""
    if _CONTEXT_KEY not in state:
        raise _unrecognised(state, path)
    context = state[_CONTEXT_KEY].shape[1]
    if context != 1024:
        raise ValueError(
            f"{str(path)!r} is an SD checkpoint with a {context}-wide text context (SD 1.x has 768); one-step SR "
            "here needs an SD 2.x model such as SD 2.1-base or SD-Turbo."
        )
    root = CONFIG_DIR / BUNDLED_SD2
    configs = {part: json.loads((root / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder")}
    configs["scheduler"] = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return configs


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Load every weight ``module`` has from ``state`` (converted keys it has no use for are skipped and logged)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{str(path)!r}: the {what} weights are incomplete; missing {missing[:5]} "
                         f"({len(missing)} in all). The file is not a complete checkpoint of this architecture.")
    unused = len(set(state) - set(own))
    if unused:
        # e.g. the 24th OpenCLIP layer that SD 2.x never uses
        logger.debug("%s: %d converted %s tensors are not part of the model", path, unused, what)
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{str(path)!r}: the {what} weights do not fit the {what} config: {wrong[:3]} "
                         f"({len(wrong)} in all). The checkpoint's architecture differs from the config used.")
    module.load_state_dict({k: state[k] for k in own}, strict=True, assign=True)


def _text_prefix(state: dict[str, torch.Tensor], path: Path) -> str:
    """Where the OpenCLIP text tower sits: the LDM prefix, or the one of Stability's sgm code (e.g. SD-Turbo)."""
    for prefix in TEXT_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return prefix
    raise ValueError(
        f"{str(path)!r} holds no text encoder (no keys under {' or '.join(TEXT_PREFIXES)}); it may be a U-Net-only "
        "file. Use a full SD 2.1-base checkpoint or a diffusers folder."
    )


def _text_encoder_skeleton(config: CLIPTextConfig) -> CLIPTextModel:
    """A CLIPTextModel without its random initialisation (seconds at full size); every weight is loaded next."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    with no_init_weights():
        return CLIPTextModel(config)


def _load_single_file(path: Path, dtype: torch.dtype, tokenizer_dir) -> SDComponents:
    state, metadata = read_checkpoint(path)
    if META_CONFIG + "unet" in metadata:
        try:
            configs = {part: json.loads(metadata[META_CONFIG + part]) for part in ("unet", "vae", "text_encoder")}
            configs["scheduler"] = json.loads(metadata.get(META_CONFIG + "scheduler", "{}"))
        except (KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(path)!r} has unreadable '{META_CONFIG}*' metadata ({err!r}); re-export it.") \
                from err
    else:
        configs = _bundled_configs(state, path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    _load_strict(unet, single_file_utils.convert_ldm_unet_checkpoint(state, dict(unet.config)), "U-Net", path)
    _load_strict(vae, single_file_utils.convert_ldm_vae_checkpoint(state, dict(vae.config)), "VAE", path)
    text_encoder = _text_encoder_skeleton(CLIPTextConfig.from_dict(configs["text_encoder"]))
    converted = single_file_utils.convert_open_clip_checkpoint(text_encoder, state, prefix=_text_prefix(state, path))
    # transformers 5 dropped the "text_model." prefix of CLIPTextModel keys; match whichever this version uses
    prefixed = next(iter(text_encoder.state_dict())).startswith("text_model.")
    converted = {("text_model." if prefixed else "") + strip_text_prefix(k): v for k, v in converted.items()}
    _load_strict(text_encoder, converted, "text encoder", path)
    return SDComponents(
        unet=_prepare(unet, dtype), vae=_prepare(vae, dtype), text_encoder=_prepare(text_encoder, dtype),
        tokenizer=load_tokenizer(tokenizer_dir),
        schedule=NoiseSchedule(ScheduleConfig.from_diffusers(configs["scheduler"])), family=base_family(unet.config),
        source=str(path), dtype=dtype,
    )


def save_single_file(
    components: SDComponents, path: str | Path, *, extra_metadata: dict[str, str] | None = None
) -> None:
    """Write U-Net, VAE and text encoder as one LDM-layout safetensors file, with their configs in the metadata.

    The inverse of the single-file branch of ``load_sd_components``: the configs (and the noise schedule's betas)
    go under ``onestep_sr.config.{unet,vae,text_encoder,scheduler}`` as JSON, so the file loads without any bundled
    config. Tensors are written in their current dtype.
    """
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
        META_CONFIG + "scheduler": json.dumps(asdict(components.schedule.config)),
        **(extra_metadata or {}),
    }
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)) for k in state)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
