"""The paper's `--aug_plus` colour: jitter 0.4 (brightness, contrast, saturation) and PCA lighting 0.1.

The RM code applies these to float tensors after ToTensor, in a random order per image, and
clamps nothing (utils.py: `img.lerp(gs, alpha)` then `img.add(rgb)`). Each jitter is
`x -> f x + (1 - f) g(x)` with `g` linear in x (0; the image's mean grey; each pixel's grey), so
without clamping they commute exactly: every order gives the same image, and a pipeline that
applies them in one order, unclamped, *is* the random order. rmix's pipelines emit uint8, so
the one difference left is the final rounding and clip to 0..255, after the lighting.

`colour_reference` is the spec, in torch: the torchvision loader runs it (in the random order, as
the paper), tests check the DALI graph against it (pipelines.dali._colour_jitter_and_lighting).
"""
import numpy as np
import torch

JITTER = 0.4                    # factors ~ U(1 - JITTER, 1 + JITTER), as the paper's ColorJitter(0.4, 0.4, 0.4)
LIGHTING = 0.1                  # alpha ~ N(0, LIGHTING) per eigenvector
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # the RM code's Grayscale
# AlexNet PCA lighting: eigenvalues and eigenvectors (columns) of ImageNet's RGB covariance, pixels in [0, 1].
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], dtype=np.float32)
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) float -> (H, W, 1) grey, the RM code's weights."""
    return (x * torch.from_numpy(GRAY_WEIGHTS)).sum(-1, keepdim=True)


def colour_reference(image: torch.Tensor, factors, alpha, order=(BRIGHTNESS, CONTRAST, SATURATION),
                     out_dtype=torch.uint8) -> torch.Tensor:
    """uint8 (H, W, 3) -> the paper's jitter in `order`, then lighting; uint8 rounded and clipped.

    Args:
        factors: (brightness, contrast, saturation), each in [0.6, 1.4].
        alpha: the lighting's 3 normal draws (times LIGHTING already).
        out_dtype: torch.float32 gives the unclamped image (pixel units), for tests.
    """
    x = image.float()
    for op in order:
        f = float(factors[op])
        if op == BRIGHTNESS:
            x = x * f
        elif op == CONTRAST:
            x = x * f + (1 - f) * _grey(x).mean()
        else:
            x = x * f + (1 - f) * _grey(x)
    offset = torch.from_numpy(PCA_EIGVEC) @ (torch.as_tensor(alpha, dtype=torch.float32) * torch.from_numpy(PCA_EIGVAL))
    x = x + offset * 255.0
    if out_dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.to(out_dtype)


class PaperColour:
    """The torchvision loader's `--aug-plus`: draws as the paper (torch's global generator) and applies."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        factors = 1 + (torch.rand(3) * 2 - 1) * JITTER
        alpha = torch.randn(3) * LIGHTING
        order = torch.randperm(3).tolist()  # the paper's random.shuffle; any order gives the same image
        return colour_reference(image, factors, alpha, order)
