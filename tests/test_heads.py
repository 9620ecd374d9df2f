"""Projection / prediction heads: layer structure and shapes (docs/design.md §2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cdg.heads import (
    MoCoProjectionHead,
    SimCLRProjectionHead,
    SimSiamPredictionHead,
    SimSiamProjectionHead,
)


def _kinds(m: nn.Module) -> list[type]:
    return [type(layer) for layer in m.layers]


def test_simclr_head_matches_spec_layers() -> None:
    head = SimCLRProjectionHead(512)
    assert _kinds(head) == [nn.Linear, nn.ReLU, nn.Linear]
    first, last = head.layers[0], head.layers[2]
    assert (first.in_features, first.out_features) == (512, 2048)
    assert (last.in_features, last.out_features) == (2048, 256)
    assert first.bias is not None and last.bias is not None


@pytest.mark.parametrize("cls", [SimCLRProjectionHead, MoCoProjectionHead])
def test_two_layer_heads_forward_equation(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    head = cls(8, hidden_dim=6, out_dim=4)
    x = torch.randn(5, 8)
    l1, l2 = head.layers[0], head.layers[2]
    expected = torch.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert head(x).shape == (5, 4)


def test_moco_head_defaults() -> None:
    head = MoCoProjectionHead(128)
    assert head.layers[0].in_features == 128
    assert head.layers[0].out_features == 2048 and head.layers[2].out_features == 256


def test_simsiam_projection_head_structure() -> None:
    head = SimSiamProjectionHead(512)
    assert _kinds(head) == [
        nn.Linear, nn.BatchNorm1d, nn.ReLU,
        nn.Linear, nn.BatchNorm1d, nn.ReLU,
        nn.Linear, nn.BatchNorm1d,
    ]  # fmt: skip
    dims = [(m.in_features, m.out_features) for m in head.layers if isinstance(m, nn.Linear)]
    assert dims == [(512, 2048), (2048, 2048), (2048, 2048)]
    assert head.layers[7].affine is False
    assert head.layers[1].affine and head.layers[4].affine


def test_simsiam_projection_output_is_batch_normalised() -> None:
    torch.manual_seed(0)
    head = SimSiamProjectionHead(8, hidden_dim=16, out_dim=12).train()
    z = head(torch.randn(32, 8))
    assert z.shape == (32, 12)
    assert torch.allclose(z.mean(0), torch.zeros(12), atol=1e-5)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(12), atol=1e-2)


def test_simsiam_prediction_head_structure() -> None:
    head = SimSiamPredictionHead()
    assert _kinds(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head.layers[0].in_features, head.layers[0].out_features) == (2048, 512)
    assert (head.layers[3].in_features, head.layers[3].out_features) == (512, 2048)
    small = SimSiamPredictionHead(12, 4, 12)
    assert small(torch.randn(6, 12)).shape == (6, 12)


def test_width_multiplier_in_dim_and_bad_dims() -> None:
    for cls in (SimCLRProjectionHead, MoCoProjectionHead, SimSiamProjectionHead):
        assert cls(1024, 32, 16)(torch.randn(4, 1024)).shape == (4, 16)
    with pytest.raises(ValueError, match="in_dim"):
        SimCLRProjectionHead(0)
