"""The PyTorch peer of ``bench/step_time.py --peer=torch``: the same ResNet and the same training
step in PyTorch eager, to time beside sat-tf in one run.

The network is built from sat-tf's own block list (``sat_tf.resnet.architecture``, which needs
no TensorFlow), so both frameworks run the same architecture: ResNet v1.5 (stride on the 3x3),
post-activation, zero-initialised last batch-norm scale in each block, pixels in [0, 255]
scaled to [-1, 1] inside the model; its parameter count is checked against sat-tf's closed
form. The step is sat-tf's: PGD-k (L-infinity, from a random start, batch norm in inference
mode, input gradient only), then a training-mode forward, label-smoothed cross-entropy,
backward and Nesterov SGD with L2 weight decay on the convolution and dense weights (batch-norm
parameters and biases excluded, like sat-tf's "non_bn" scope). PyTorch's default NCHW layout.

Optional: ``pip install torch`` (here: ``pip install torch==2.13.0``, the CPU build).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sat_tf.resnet.architecture import STEM_FILTERS, Block


class _Block(nn.Module):
    def __init__(self, b: Block, act):
        super().__init__()
        self.act = act
        self.proj = None
        if b.projection:
            self.proj = nn.Sequential(
                nn.Conv2d(b.in_filters, b.out_filters, 1, b.stride, bias=False),
                nn.BatchNorm2d(b.out_filters, eps=1e-5, momentum=0.1))
        if b.kind == "basic":
            convs = [(b.in_filters, b.width, 3, b.stride, 1), (b.width, b.out_filters, 3, 1, 1)]
        elif b.kind == "bottleneck":
            convs = [(b.in_filters, b.width, 1, 1, 1), (b.width, b.width, 3, b.stride, b.groups),
                     (b.width, b.out_filters, 1, 1, 1)]
        else:
            raise ValueError(f"Invalid block kind {b.kind!r} for the PyTorch peer; valid "
                             "choices: basic, bottleneck (the ResNet family).")
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, k, s, padding=k // 2, groups=g, bias=False) for i, o, k, s, g in convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(o, eps=1e-5, momentum=0.1) for _, o, *_ in convs)
        nn.init.zeros_(self.bns[-1].weight)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        y = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = bn(conv(y))
            if i < len(self.convs) - 1:
                y = self.act(y)
        return self.act(shortcut + y)


class ResNet(nn.Module):
    def __init__(self, blocks: list[Block], *, stem: str, activation: str, num_classes: int):
        super().__init__()
        acts = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"Invalid activation {activation!r} for the PyTorch peer; valid "
                             f"choices: {', '.join(acts)}.")
        act = acts[activation]()
        k, s = (7, 2) if stem == "imagenet" else (3, 1)
        layers = [nn.Conv2d(3, STEM_FILTERS, k, s, padding=k // 2, bias=False),
                  nn.BatchNorm2d(STEM_FILTERS, eps=1e-5, momentum=0.1), act]
        if stem == "imagenet":
            layers.append(nn.MaxPool2d(3, 2, padding=1))
        layers += [_Block(b, act) for b in blocks]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(blocks[-1].out_filters, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, pixels):
        x = pixels * (2.0 / 255.0) - 1.0
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Step:
    """One training step (PGD-``attack_steps`` first when > 0) on a fixed NHWC batch."""

    def __init__(self, model: ResNet, images, labels, *, attack_steps: int, epsilon: float = 4.0,
                 step_size: float = 4.0, label_smoothing: float = 0.1, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4):
        self.model = model.train()
        self.x = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()
        self.y = torch.as_tensor(labels).long()
        self.k, self.eps, self.step_size = attack_steps, epsilon, step_size
        self.label_smoothing = label_smoothing
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
        self.opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                    {"params": rest, "weight_decay": 0.0}],
                                   lr=lr, momentum=momentum, nesterov=True)

    def attack(self):
        x, eps = self.x, self.eps
        self.model.eval()
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 255.0)
        for _ in range(self.k):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(self.model(x_adv), self.y, reduction="sum")
            grad, = torch.autograd.grad(loss, x_adv)
            x_adv = torch.minimum(torch.maximum(x_adv.detach() + self.step_size * grad.sign(),
                                                x - eps), x + eps).clamp(0.0, 255.0)
        self.model.train()
        return x_adv

    def __call__(self) -> float:
        inputs = self.attack() if self.k > 0 else self.x
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(inputs), self.y, label_smoothing=self.label_smoothing)
        loss.backward()
        self.opt.step()
        value = loss.detach().item()
        if not math.isfinite(value):
            raise FloatingPointError(f"PyTorch peer loss is {value}")
        return value
