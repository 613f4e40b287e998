"""The training step (hjepa.engine.step) as the Trainer runs it: no host syncs, fused AdamW
on CUDA, no GradScaler under bf16, and the EMA as one foreach op."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hjepa.data.batch import Item
from hjepa.data.mixture import Mixture
from hjepa.data.synthetic import SyntheticShapes
from hjepa.data.transforms import normalize
from hjepa.engine.device import Hardware
from hjepa.engine.optim import Optimization
from hjepa.engine.step import forward_backward, optimizer_update
from hjepa.engine.trainer import _Meter
from hjepa.masks import MultiBlockMaskCollator
from hjepa.models.hjepa import HJEPA

LEVELS = [{"depth": "last", "stride": 1, "weight": 1.0}, {"depth": 2, "stride": 2, "weight": 0.5},
          {"depth": "last", "stride": 4, "weight": 0.25}]


# Ops that read device data back to the host, or whose output size depends on the data
# (which on a GPU means waiting for it).
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "bincount", "unique", "_unique", "_unique2", "masked_select",
            "is_nonzero", "equal", "repeat_interleave", "nonzero_static"}


class _RecordSyncs(TorchDispatchMode):
    def __init__(self, host_tensors):
        super().__init__()
        self.host = {t.untyped_storage().data_ptr() for t in host_tensors}
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name == "repeat_interleave" and not (tensors and tensors[0].dtype == torch.long and tensors[0].dim() == 1):
                pass  # repeat_interleave(x, int) needs no data; only the tensor-of-repeats form syncs
            elif not any(t.untyped_storage().data_ptr() in self.host for t in tensors):
                self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_training_step_has_no_host_syncs():
    """The Trainer's step (batch to device, normalise, forward, backward, optimizer, EMA,
    loss meter) on the CPU, with every dispatched op recorded: none may read device values
    back. Host-side tensors (the batch's source ids, the optimizer's CPU step counters)
    are allowed to be read, as they are on a GPU too."""
    torch.manual_seed(0)
    model = HJEPA("test_vit", 32, 4, LEVELS, 32, 1, 2)
    hardware = Hardware(device="cpu", precision="fp32", batch_size=4, num_workers=0)
    optimization = Optimization()
    optimizer = optimization.build(model)
    scaler = hardware.grad_scaler()
    collator = MultiBlockMaskCollator(model.grid_size, min_keep=4)
    data = Mixture({"shapes": SyntheticShapes("train", num_train=8)})
    items = [Item(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), 0, 0, k) for k in range(4)]
    meter = _Meter(torch.device("cpu"), 1)

    def step(i, batch):
        optimization.apply(optimizer, i, 100)
        batch = data.to_device(batch, torch.device("cpu"))
        out = forward_backward(model, normalize(batch.images), batch.context, batch.targets, hardware.autocast(),
                               scaler)
        meter.add(out, batch.sources)
        optimizer_update(model, optimizer, scaler, 1.0, optimization.momentum_at(i, 100))

    step(0, collator(items))  # creates the optimizer state
    steps = [s["step"] for s in optimizer.state.values()]
    for i in range(1, 3):
        batch = collator(items)
        with _RecordSyncs([batch.sources, *steps]) as rec:
            step(i, batch)
        assert rec.found == [], f"host syncs in the training step: {rec.found}"
    assert meter.count == 3


def test_trainer_uses_fused_adamw_on_cuda_and_no_grad_scaler_under_bf16():
    model = HJEPA("test_vit", 32, 4, LEVELS[:1], 32, 1, 2)
    assert Optimization().build(model, fused=True).defaults["fused"] is True
    cpu = Optimization().build(model)
    assert cpu.defaults["foreach"] is True
    assert not Hardware(device="cpu", precision="bf16").grad_scaler().is_enabled()
    assert not Hardware(device="cpu", precision="fp32").grad_scaler().is_enabled()


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_ema_is_one_foreach_lerp():
    """The EMA of every target parameter is a single _foreach_lerp_ (not a Python loop of
    per-tensor ops), and it computes target + (1 - momentum) * (online - target)."""
    torch.manual_seed(0)
    model = HJEPA("test_vit", 32, 4, LEVELS[:1], 32, 1, 2)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    expected = [0.9 * t + 0.1 * o for t, o in zip(model.target_encoder.parameters(), model.encoder.parameters())]
    with _RecordOps() as rec:
        model.update_target(0.9)
    lerps = [n for n in rec.names if "lerp" in n]
    assert lerps == ["_foreach_lerp_"], rec.names
    per_tensor = [n for n in rec.names if n not in ("_foreach_lerp_", "copy_")]
    assert per_tensor == [], per_tensor  # nothing else runs per parameter
    for e, t in zip(expected, model.target_encoder.parameters()):
        torch.testing.assert_close(t, e)
