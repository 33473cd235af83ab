"""The step-time bench's PyTorch peer: the same network as sat-tf's (parameter counts from the
closed form), a step that keeps the attack's box, and one-line refusals of what it cannot do."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from sat_tf import families, models

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _bench(*args):
    return subprocess.run([sys.executable, str(BENCH / "step_time.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    (["--model=efficientnet-b0"], "Invalid --model 'efficientnet-b0' for --peer=torch; valid "
                                  "choices: resnet-<depth>, resnext-<depth>-<c>x<w>d."),
    (["--model=resnet-18", "--activations=relu,smooth_relu"],
     "Invalid --activations entry 'smooth_relu' for --peer=torch; valid choices: relu, silu, "
     "gelu."),
])
def test_peer_refuses_what_it_cannot_build_in_one_line(args, message):
    proc = _bench("--peer=torch", *args)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name, size", [("resnet-18", 32), ("resnet-50", 224),
                                        ("resnext-50-32x4d", 224)])
def test_torch_peer_is_the_same_network(name, size):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(BENCH))
    import torch_peer
    spec = models.resolve(name, "silu", 1000, image_size=size)
    family = families.FAMILIES[spec.family]
    peer = torch_peer.ResNet(family.blocks(spec.args), stem=spec.stem, activation="silu",
                             num_classes=1000)
    assert torch_peer.num_params(peer) == models.count_params(name, 1000, image_size=size)
    if name == "resnet-18":
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (4, size, size, 3)).astype(np.float32)
        y = rng.integers(0, 1000, 4)
        step = torch_peer.Step(peer, x, y, attack_steps=2, epsilon=4.0, step_size=1.0)
        adv = step.attack().permute(0, 2, 3, 1).numpy()
        assert np.abs(adv - x).max() <= 4.0 + 1e-4 and adv.min() >= 0 and adv.max() <= 255
        assert np.abs(adv - x).max() > 1.0 and peer.training
        before = [p.detach().clone() for p in peer.parameters()]
        assert np.isfinite(step())
        assert any(not torch.equal(a, p) for a, p in zip(before, peer.parameters()))
