"""benchmarks/rejected_class_pixels.py counts the scored pixels given a class the image-level prediction
rejects."""

import torch
from torch import nn

from benchmarks.rejected_class_pixels import count_model


class FixedModel(nn.Module):
    """Image logits favour classes 1 and 2 (0 and 3 rejected at 0.5); the scores give class 0 the left
    column of every image, class 2 the rest."""

    threshold = 0.5
    num_classes = 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[-3.0, 2.0, 1.0, -3.0]]).expand(len(images), 4)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(len(images), 4, *images.shape[-2:])
        scores[:, 2] = 1.0
        scores[:, 0, :, 0] = 2.0
        return scores


def test_counts_scored_pixels_given_a_rejected_class():
    images = torch.zeros(2, 3, 4, 4)
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[0, 0, 0] = 4  # one background pixel in the rejected column: not scored
    loader = [(images, masks, torch.arange(2))]
    counts = count_model(FixedModel(), loader)
    assert counts == {"scored": 31, "rejected": 7, "lost": 0}
