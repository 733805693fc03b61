"""Extra cost of each method over the OSEDiff form at a 512² output, full-size random-weight models.

Each method runs in its own subprocess (so the peak resident memory, ru_maxrss, is that method's alone): the OSEDiff
form (encode, text, U-Net, decode) plus the method's own stages, with the modules at their paper sizes:
IDaS-SR MINE (DiT-S/2) + CHARIOT, CODSR Sobel noise + LQFM (320 ch) hooked into conv_in, RCOD CLIP ViT-L/14 +
VPIM + MEM (257 visual tokens instead of 77 text tokens), TADSR the time-aware encoder in place of the plain one.

    .venv/bin/python scripts/benchmark_methods.py [--methods osediff idas codsr rcod tadsr]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import full_size_sd21  # noqa: E402

from osd_core.chariot import chariot  # noqa: E402
from osd_core.idas import mine_estimate  # noqa: E402
from osd_core.imageprep import prepare_image  # noqa: E402
from osd_core.mem import MEM, MEMConfig  # noqa: E402
from osd_core.mine import MINE, MINEConfig  # noqa: E402
from osd_core.onestep import one_step_denoise  # noqa: E402
from osd_core.parameterisation import Parameterisation  # noqa: E402
from osd_core.schedule import NoiseSchedule  # noqa: E402
from osd_core.sft import LQFM, LQFMConfig, conv_in_hook, lambda_t  # noqa: E402
from osd_core.sobel import region_adaptive_noise  # noqa: E402
from osd_core.text import add_embedding, encode_prompt  # noqa: E402
from osd_core.vae import decode_latent, encode_latent  # noqa: E402
from osd_core.vpim import VPIM, VPIMConfig, preprocess  # noqa: E402

METHODS = ("osediff", "idas", "codsr", "rcod", "tadsr")


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Fill zero-initialised heads so the modules do real work (their cost does not depend on the values)."""
    with torch.no_grad():
        for param in module.parameters():
            if not bool(param.any()):
                param.normal_(0, 0.02)
    return module.eval()


def run(method: str, size: int, factor: float) -> dict:
    torch.manual_seed(0)
    unet, vae, text_encoder, tokenizer = full_size_sd21(torch.float32, torch.device("cpu"))
    sched = NoiseSchedule()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    times: dict[str, float] = {}

    def stage(name, fn):
        start = time.perf_counter()
        value = fn()
        times[name] = time.perf_counter() - start
        return value

    with torch.inference_mode():
        prepared = prepare_image(image, factor)
        encoder = None
        t = torch.tensor([999.0])
        if method == "tadsr":
            from osd_core.tae import TAEConfig, TimeAwareEncoder

            tae = _randomise(TimeAwareEncoder(vae.encoder, vae.quant_conv, TAEConfig()))
            t = torch.tensor([500.0])
            encoder = lambda x: tae(x, t)  # noqa: E731
        z = stage("encode", lambda: encode_latent(vae, prepared.x, seed=0, encoder=encoder))
        cond = stage("text", lambda: encode_prompt(text_encoder, tokenizer, ""))
        noise, hook, kind = None, None, Parameterisation.STANDARD
        if method == "idas":
            mine = _randomise(MINE(MINEConfig()))
            est = stage("mine", lambda: mine_estimate(mine, z))
            cond = add_embedding(cond, est.d)
            t, noise = stage("chariot", lambda: chariot(est.tau, est.eps_inv, 0.6, seed=0))
        if method == "codsr":
            lqfm = _randomise(LQFM(LQFMConfig()))
            t = torch.tensor([100.0])
            noise, _ = stage("sobel", lambda: region_adaptive_noise(prepared.x, 0, latent_shape=tuple(z.shape)))
            gamma, beta = stage("lqfm", lambda: lqfm(prepared.x))
            hook, kind = conv_in_hook(gamma, beta, lambda_t(t, sched)), Parameterisation.NOISE_RESIDUAL
        if method == "rcod":
            from transformers import CLIPVisionConfig, CLIPVisionModel

            tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                                     num_hidden_layers=24, patch_size=14, image_size=224)).eval()
            vpim, mem = _randomise(VPIM(VPIMConfig())), _randomise(MEM(MEMConfig()))
            tokens = stage("clip_vision", lambda: tower(pixel_values=preprocess(prepared.x, vpim.config))
                           .last_hidden_state)
            cond = stage("vpim", lambda: vpim(tokens))
            t = stage("mem", lambda: mem.estimate_timestep(z, tokens))
        if method == "tadsr":
            kind = Parameterisation.SCALED_RESIDUAL
        z0 = stage("unet", lambda: one_step_denoise(unet, sched, kind, z, cond, t, noise=noise, conv_in_hook=hook))
        stage("decode", lambda: decode_latent(vae, z0))
    times["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # the per-method subprocess
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run(args.one, args.size, args.factor)))
        return
    results = {}
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--one", method, "--size", str(args.size),
                              "--factor", str(args.factor)], capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results.get("osediff")
    out_px = round(args.size * args.factor)
    print(f"{out_px}x{out_px} output, fp32, CPU; seconds per stage; peak RSS of the whole process")
    for method, times in results.items():
        total = sum(v for k, v in times.items() if k != "peak_rss_gb")
        stages = ", ".join(f"{k} {v:.2f}" for k, v in times.items() if k != "peak_rss_gb")
        extra = "" if base is None or method == "osediff" else (
            f"; extra {total - sum(v for k, v in base.items() if k != 'peak_rss_gb'):+.2f} s, "
            f"{times['peak_rss_gb'] - base['peak_rss_gb']:+.2f} GB")
        print(f"  {method:8s} total {total:6.2f} s, peak {times['peak_rss_gb']:.2f} GB{extra}\n           {stages}")


if __name__ == "__main__":
    main()
