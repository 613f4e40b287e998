"""Activation checkpointing (model.grad_checkpointing): the same losses and gradients as
without it, fewer activations kept for backward, through the config and the Trainer, and
`python -m hjepa.bench memory` at tiny sizes on the CPU."""

import json

import torch

from hjepa.bench.__main__ import main as bench_main
from hjepa.config import build, validate
from hjepa.masks import MultiBlockMaskCollator
from hjepa.models.hjepa import HJEPA
from hjepa.train import train

LEVELS = [{"depth": "last", "stride": 1, "weight": 1.0}, {"depth": 2, "stride": 2, "weight": 0.5}]


def tiny_model(grad_checkpointing: bool) -> HJEPA:
    torch.manual_seed(0)
    # drop_path > 0: the recomputed forward must replay the same random drops
    return HJEPA("test_vit", 32, 4, LEVELS, predictor_dim=32, predictor_depth=2, predictor_heads=2,
                 drop_path_rate=0.2, grad_checkpointing=grad_checkpointing).train()


def batch(model: HJEPA):
    g = torch.Generator().manual_seed(1)
    context, targets = MultiBlockMaskCollator(model.grid_size, min_keep=4).sample(4, g)
    images = torch.randn(4, 3, 32, 32, generator=g)
    return images, context, targets


def loss_and_grads(model: HJEPA):
    torch.manual_seed(2)
    out = model(*batch(model))
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def test_same_losses_and_gradients_with_and_without():
    plain, ckpt = tiny_model(False), tiny_model(True)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ckpt.state_dict().values()))
    out_plain, grads_plain = loss_and_grads(plain)
    out_ckpt, grads_ckpt = loss_and_grads(ckpt)
    assert out_plain.keys() == out_ckpt.keys()
    for key in out_plain:
        assert torch.equal(out_plain[key], out_ckpt[key]), key
    assert grads_plain.keys() == grads_ckpt.keys()
    missing = [n for n, g in grads_plain.items() if g is None]
    assert not missing, missing
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=0, atol=0, msg=name)
    # and the drops were really random: another seed gives another loss
    torch.manual_seed(3)
    assert not torch.equal(plain(*batch(plain))["loss"], out_plain["loss"])


def saved_bytes(model: HJEPA) -> int:
    """Bytes of the tensors autograd keeps for backward outside checkpointed regions."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*batch(model))["loss"]
    return total


def test_checkpointing_keeps_fewer_activations():
    plain, ckpt = saved_bytes(tiny_model(False)), saved_bytes(tiny_model(True))
    # the blocks' internals (attention, MLP) are recomputed, only block inputs are kept
    assert ckpt < plain / 2, (ckpt, plain)


def test_grad_checkpointing_from_the_config_trains_the_same(tiny, tmp_path, losses):
    cfg = validate(tiny("model.grad_checkpointing=true", "trainer.epochs=1"))
    model = build(cfg.model)
    assert model.grad_checkpointing and model.predictor.grad_checkpointing
    assert validate(tiny()).model.grad_checkpointing is False  # the default
    with_ckpt = train(cfg, tmp_path / "on")
    without = train(validate(tiny("trainer.epochs=1")), tmp_path / "off")
    assert with_ckpt.status == without.status == "completed"
    assert losses(tmp_path / "on") == losses(tmp_path / "off")


def test_bench_memory_on_the_cpu(capsys):
    argv = ["memory", "--models", "hjepa_vit_micro", "--img", "32", "--patch", "4", "--batch", "4",
            "--precision", "fp32", "--warmup", "1", "--steps", "2", "--json"]
    assert bench_main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    speed = [r for r in rows if r["what"] == "train step"]
    memory = [r for r in rows if r["what"] == "peak memory"]
    assert [r["grad_checkpointing"] for r in speed] == [False, True]
    assert all(r["value"] > 0 for r in speed)
    assert speed[1]["baseline"] == speed[0]["value"]
    assert speed[1]["ratio"] == speed[1]["value"] / speed[0]["value"]
    assert [r["grad_checkpointing"] for r in memory] == [False, True]
    if torch.cuda.is_available():
        assert memory[1]["ratio"] == memory[0]["value"] / memory[1]["value"]
    else:  # no proxy: the CPU has no peak-memory counter to read
        assert all(r["value"] == "not measured" and r["ratio"] is None for r in memory)
        assert all("max_memory_allocated" in r["note"] for r in memory)
