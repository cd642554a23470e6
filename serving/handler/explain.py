"""Why the model answered what it did: Integrated Gradients (Captum) on the served TorchScript
model, for the digit it predicted, against a blank image.

POST /explanations/mnist answers each image with
    {"digit": 7, "is_digit": true, "confidence": 0.998, "attributions": [[...28 floats...], ... 28 rows],
     "method": "integrated_gradients", "baseline": "blank",
     "frame": {"left", "top", "pixel_width", "pixel_height"}, "model_version": "..."}
is_digit and confidence are the prediction's (artifact.predictions: the trust record);
attributions[row][col] is how much model input pixel (row, col) raised the predicted digit's
logit over a blank image's (they sum to that rise, within ~2%); frame places that 28x28 grid
on the image as sent (serving/handler/preprocess.py's Frame), so a page can draw the map over it.

Shipped beside handler.py in the model archive (the handler imports it as a top-level module
there). Captum is a project dependency (pyproject.toml); the ONNX model has no gradients, so an
archive serving ONNX refuses explanations (parsing.explanation_error) and never calls this.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import torch
from captum.attr import IntegratedGradients

if __package__:  # imported from the source tree (tests)
    from .preprocess import Frame
else:  # inside the model archive
    from preprocess import Frame

METHOD, BASELINE = "integrated_gradients", "blank"
# Gauss-Legendre steps along the path from the blank image: at 32 the maps sum to the logit's
# rise within 0.19 of rises of 4 to 19 (48 MNIST test digits, the test recipe's model), and 4
# images take ~0.3 s on one core (16 steps: 0.2 s; 64: 0.4 s).
IG_STEPS = 32
# Interpolated images through the model at once: bounds the memory of one explanation batch.
IG_CHUNK_IMAGES = 64
# Significant digits of a map's largest value that every value keeps: finer is noise (the blank
# background gets ~1e-10, float rounding of its normalization, instead of 0), and a map is then
# ~3-7 KB of JSON instead of ~16 KB.
ATTRIBUTION_DIGITS = 4


def blank_baseline(inputs: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """A blank image as model input: every pixel the background (0 ink), normalized."""
    return torch.full_like(inputs, (0.0 - mean) / std)


def attribute(module, inputs: np.ndarray, targets: np.ndarray, mean: float, std: float,
              device: torch.device | str = "cpu") -> np.ndarray:
    """Integrated Gradients of module's targets[i] logit for inputs[i] (normalized [N, 1, 28, 28])
    against a blank image: float32 [N, 28, 28]."""
    images = torch.from_numpy(np.ascontiguousarray(inputs)).to(device)
    with torch.enable_grad():   # the handler may be called under no_grad; IG needs gradients
        maps = IntegratedGradients(module).attribute(
            images, baselines=blank_baseline(images, mean, std),
            target=torch.from_numpy(np.asarray(targets, dtype=np.int64)).to(device),
            n_steps=IG_STEPS, internal_batch_size=IG_CHUNK_IMAGES)
    return maps.detach().float().cpu().numpy()[:, 0]


def rounded_map(attribution: np.ndarray) -> list[list[float]]:
    """The map rounded to ATTRIBUTION_DIGITS significant digits of its largest magnitude."""
    largest = float(np.abs(attribution).max())
    if not math.isfinite(largest) or largest == 0:   # non-finite: the handler answers that request 500
        return attribution.astype(np.float64).tolist()
    decimals = ATTRIBUTION_DIGITS - math.ceil(math.log10(largest))
    # + 0.0: a tiny negative value rounds to -0.0, which JSON would carry as "-0.0".
    return (np.round(attribution.astype(np.float64), decimals) + 0.0).tolist()


def explanation(prediction: dict, attribution: np.ndarray, frame: Frame) -> dict:
    """One image's explanation answer, from its prediction answer (artifact.predictions)."""
    return {"digit": prediction["digit"], "is_digit": prediction["is_digit"], "confidence": prediction["confidence"],
            "attributions": rounded_map(attribution), "method": METHOD, "baseline": BASELINE,
            "frame": {key: round(value, 3) for key, value in asdict(frame).items()},
            "model_version": prediction["model_version"]}
