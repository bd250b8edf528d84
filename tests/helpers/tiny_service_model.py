"""A tiny CNN for the service-mode tests (``--model helpers.tiny_service_model:tiny``)."""
from __future__ import annotations

import torch


def tiny() -> torch.nn.Module:
    """Conv, ReLU, pooling, linear: every kind of secure layer, in milliseconds."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AvgPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 5))
