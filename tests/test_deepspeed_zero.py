"""SalientAdamW as a DeepSpeed ZeRO-2 / ZeRO-3 client optimizer over compact deltas, on the CPU.

The scale path trains, for each frozen weight, one flat parameter holding only its selected
entries (a compact delta applied over the frozen base), so ZeRO's flattening cannot break the
saliency mask.  Single process, gloo, DS_ACCELERATOR=cpu, run as a subprocess (this file is also the script) so
DeepSpeed's environment, process group and imports stay out of the test session; compared with
the same training without DeepSpeed.
"""
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

from fasterase.optim import SalientAdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
STEPS = 6


class CompactDeltaLinear(torch.nn.Module):
    """A frozen linear layer plus a trainable delta on the selected entries of its weight."""

    def __init__(self, base: torch.nn.Linear, selected: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", base.weight.detach().clone())
        self.register_buffer("bias", base.bias.detach().clone())
        self.register_buffer("index", selected.reshape(-1).nonzero().view(-1))
        self.delta = torch.nn.Parameter(torch.zeros(self.index.numel()))

    def forward(self, x):
        w = self.weight.reshape(-1).index_add(0, self.index, self.delta).view_as(self.weight)
        return torch.nn.functional.linear(x, w, self.bias)


class Net(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        dense = [torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)]
        self.layers = torch.nn.ModuleList(
            CompactDeltaLinear(layer, torch.rand(layer.weight.shape, generator=g) < 0.3) for layer in dense)

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)) for _ in range(STEPS)]


def train_plain(state_dtype):
    net = Net(0)
    opt = SalientAdamW(net.parameters(), state_dtype=state_dtype, min_8bit_size=1, **HYPER)
    for x, y in batches():
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return [layer.delta.detach().clone() for layer in net.layers]


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = [(2, "fp32"), (3, "fp32"), (2, "8bit")]


@pytest.fixture(scope="module")
def deepspeed_deltas(tmp_path_factory):
    """{(stage, state_dtype): trained deltas}, from one DeepSpeed subprocess."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    out = tmp_path_factory.mktemp("deepspeed") / "deltas.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def train_deepspeed(deepspeed, stage, state_dtype):
    net = Net(0)
    opt = SalientAdamW(net.parameters(), state_dtype=state_dtype, min_8bit_size=1, **HYPER)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    for x, y in batches():
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    if stage == 3:
        params = [layer.delta for layer in engine.module.layers]
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [layer.delta.detach().clone() for layer in engine.module.layers]


def main(out_path: str) -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        raise SystemExit(f"DeepSpeed picked accelerator {get_accelerator().device_name()!r}, not cpu")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.save({config: train_deepspeed(deepspeed, *config) for config in CONFIGS}, out_path)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_plain_training_fp32_states(deepspeed_deltas, stage):
    expected = train_plain("fp32")
    for a, b in zip(deepspeed_deltas[(stage, "fp32")], expected):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_zero2_8bit_states_track_plain_training(deepspeed_deltas):
    """ZeRO flattens the deltas into one partition, so 8-bit blocks straddle tensors and the
    quantisation differs: the trained deltas agree to 5% of their magnitude."""
    expected = train_plain("8bit")
    for a, b in zip(deepspeed_deltas[(2, "8bit")], expected):
        assert (a - b).abs().max() <= 0.05 * b.abs().max()


if __name__ == "__main__":
    main(sys.argv[1])
