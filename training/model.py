"""The digit CNN: defined once here; training, export and benchmarks import it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

NUM_CLASSES = 10   # the digits 0-9: the one place the class count is typed


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    block1_channels: int = 32
    block2_channels: int = 64
    hidden_units: int = 256
    conv_dropout: float = 0.1
    fc_dropout: float = 0.3
    image_size: int = 28

    def to_dict(self) -> dict:
        return asdict(self)


def conv_block(in_channels: int, out_channels: int, dropout: float) -> nn.Sequential:
    """Two 3x3 conv + BN + ReLU layers, then a 2x2 max-pool that halves the image."""
    # Convolutions feed BatchNorm, whose shift makes a conv bias redundant.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Dropout2d(dropout),
    )


class DigitCNN(nn.Module):
    """Input: (N, 1, 28, 28) normalized images. Output: (N, num_classes) logits."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        pooled_size = config.image_size // 4  # two 2x2 pools: 28 -> 14 -> 7
        flat_features = config.block2_channels * pooled_size * pooled_size  # 64 * 7 * 7 = 3136
        self.features = nn.Sequential(
            conv_block(config.in_channels, config.block1_channels, config.conv_dropout),
            conv_block(config.block1_channels, config.block2_channels, config.conv_dropout),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat_features, config.hidden_units),
            nn.ReLU(inplace=True),
            nn.Dropout(config.fc_dropout),
            nn.Linear(config.hidden_units, config.num_classes),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def build_model(config: ModelConfig | dict | None = None) -> DigitCNN:
    """Build the network from a ModelConfig or the plain dict stored in a checkpoint."""
    if config is None:
        config = ModelConfig()
    elif isinstance(config, dict):
        config = ModelConfig(**config)
    return DigitCNN(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
