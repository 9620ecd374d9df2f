"""cdg.eval.recalibrate_bn: running statistics become those of the chosen branch's own activations."""

from __future__ import annotations

import torch

from cdg.eval.bn import recalibrate_bn
from cdg.models import create_model
from cdg.nn import make_conv_layer


def test_running_stats_are_the_branch_inputs_own():
    torch.manual_seed(0)
    net = create_model("resnet18", width=0.125, conv_layer=make_conv_layer("dual", gate_groups=2, gate_kernel="torch"))
    bn = net.layer1[0].bn1
    bn.running_mean.fill_(5.0)  # stands for statistics mixed over both branches
    seen = []
    handle = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().float()))
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    n = recalibrate_bn(net, images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), branch=0, batch_size=32)
    handle.remove()
    assert n == 20 and not net.training and bn.momentum == 0.1
    x = torch.cat(seen)  # branch a1's inputs to this BN, all 96 images
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    # BatchNorm averages the per-batch unbiased variances (momentum=None): three equal batches
    per_batch = torch.stack([b.var((0, 2, 3), unbiased=True) for b in x.split(32)]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch, rtol=1e-4, atol=1e-5)
