"""ComfyUI nodes of comfyui-onestep-sr: thin adapters over ``osd_core`` (DESIGN.md "Node catalogue")."""

from .codsr import OneStepSRSFTModulation, OneStepSRSobelNoise
from .colorfix import OneStepSRColorFix
from .conditioning import OneStepSRTextConditioning
from .decode import OneStepSRDecode
from .denoise import OneStepSRDenoise
from .encode import OneStepSREncode
from .idas import OneStepSRChariotMix, OneStepSRMINEEstimate
from .loader import OneStepSRLoadModel
from .noise import OneStepSRGaussianNoise
from .rcod import OneStepSRRealismLevel, OneStepSRVisualPrompt
from .timestep import OneStepSRTimestep

NODE_CLASS_MAPPINGS = {
    "OneStepSRLoadModel": OneStepSRLoadModel,
    "OneStepSREncode": OneStepSREncode,
    "OneStepSRTimestep": OneStepSRTimestep,
    "OneStepSRGaussianNoise": OneStepSRGaussianNoise,
    "OneStepSRTextConditioning": OneStepSRTextConditioning,
    "OneStepSRDenoise": OneStepSRDenoise,
    "OneStepSRDecode": OneStepSRDecode,
    "OneStepSRColorFix": OneStepSRColorFix,
    "OneStepSRMINEEstimate": OneStepSRMINEEstimate,
    "OneStepSRChariotMix": OneStepSRChariotMix,
    "OneStepSRSobelNoise": OneStepSRSobelNoise,
    "OneStepSRSFTModulation": OneStepSRSFTModulation,
    "OneStepSRRealismLevel": OneStepSRRealismLevel,
    "OneStepSRVisualPrompt": OneStepSRVisualPrompt,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "OneStepSRLoadModel": "OneStep SR Load Model",
    "OneStepSREncode": "OneStep SR Encode",
    "OneStepSRTimestep": "OneStep SR Timestep",
    "OneStepSRGaussianNoise": "OneStep SR Gaussian Noise",
    "OneStepSRTextConditioning": "OneStep SR Text Conditioning",
    "OneStepSRDenoise": "OneStep SR One-Step Denoise",
    "OneStepSRDecode": "OneStep SR Decode",
    "OneStepSRColorFix": "OneStep SR Color Fix",
    "OneStepSRMINEEstimate": "OneStep SR MINE Estimate (IDaS-SR)",
    "OneStepSRChariotMix": "OneStep SR CHARIOT Mix (IDaS-SR)",
    "OneStepSRSobelNoise": "OneStep SR Sobel Noise (CODSR)",
    "OneStepSRSFTModulation": "OneStep SR SFT Modulation (CODSR)",
    "OneStepSRRealismLevel": "OneStep SR Realism Level (RCOD)",
    "OneStepSRVisualPrompt": "OneStep SR Visual Prompt (RCOD)",
}
