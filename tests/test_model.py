import pytest
import torch

from training.model import ModelConfig, build_model, count_parameters


def expected_parameter_count(c: ModelConfig) -> int:
    conv = lambda cin, cout: cin * cout * 9          # 3x3, no bias (BatchNorm follows)
    bn = lambda ch: 2 * ch                           # weight and bias
    flat = c.block2_channels * (c.image_size // 4) ** 2
    return (conv(c.in_channels, c.block1_channels) + bn(c.block1_channels)
            + conv(c.block1_channels, c.block1_channels) + bn(c.block1_channels)
            + conv(c.block1_channels, c.block2_channels) + bn(c.block2_channels)
            + conv(c.block2_channels, c.block2_channels) + bn(c.block2_channels)
            + flat * c.hidden_units + c.hidden_units + c.hidden_units * c.num_classes + c.num_classes)


def test_output_shape_for_several_batch_sizes():
    model = build_model().eval()
    for batch in (1, 7, 64):
        assert model(torch.randn(batch, 1, 28, 28)).shape == (batch, 10)


def test_parameter_count_matches_the_design():
    config = ModelConfig()
    assert count_parameters(build_model(config)) == expected_parameter_count(config) == 870_826


def test_flattened_features_are_3136():
    model = build_model()
    assert model.classifier[1].in_features == 3136


def test_rebuilds_from_plain_dict():
    config = ModelConfig(hidden_units=128)
    model = build_model(config.to_dict())
    assert model.config == config
    assert model.classifier[1].out_features == 128


@pytest.mark.parametrize("layer_type", [torch.nn.Conv2d, torch.nn.Linear])
def test_kaiming_init_scale(layer_type):
    torch.manual_seed(0)
    model = build_model()
    for module in model.modules():
        if isinstance(module, layer_type):
            fan_in = module.weight[0].numel()
            expected_std = (2.0 / fan_in) ** 0.5
            assert module.weight.std().item() == pytest.approx(expected_std, rel=0.15)
