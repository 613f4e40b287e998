"""The CUDA tier: what only a GPU can show about the training path (`pytest -m cuda`).

Every test here is marked `cuda` and skips, with the reason, where PyTorch sees no CUDA GPU
(CI, laptops): stage 1 of experiments/gpu/run.sh runs them on the lent GPU. Tolerances are
stated per test. `HJEPA_CUDA_TIER_DEVICE=cpu python -m pytest -m cuda tests/test_cuda.py`
runs the same tests with the CPU standing in for the GPU, which checks the tier's own logic
(not the GPU) where there is none.
"""

import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from hjepa.data.batch import EncodedBatch
from hjepa.data.cache import augment_batch
from hjepa.data.folder import FileDataset, ImageFolder
from hjepa.data.gpu_decode import decode_batch
from hjepa.data.transforms import normalize, train_transform
from hjepa.engine import checkpoint as ckpt
from hjepa.engine.device import Hardware
from hjepa.engine.optim import Optimization
from hjepa.engine.step import forward_backward, optimizer_update
from hjepa.engine.trainer import Trainer
from hjepa.evaluate import evaluate
from hjepa.export import export
from hjepa.masks import MultiBlockMaskCollator
from hjepa.models.hjepa import HJEPA
from hjepa import runs
from hjepa.runs import load_run
from hjepa.train import train

DEVICE = torch.device(os.environ.get("HJEPA_CUDA_TIER_DEVICE", "cuda"))
CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False here); "
                              "run by stage 1 of experiments/gpu/run.sh on the GPU machine"),
]
HARDWARE = [f"hardware.device={DEVICE.type}", "hardware.precision=bf16", "hardware.pin_memory=true"]
LEVELS = [{"depth": "last", "stride": 1, "weight": 1.0}, {"depth": 1, "stride": 2, "weight": 0.5}]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 here (no TF32 matmuls), so that fp32 on the GPU is a reference."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _model(seed: int = 0) -> HJEPA:
    torch.manual_seed(seed)
    return HJEPA("test_vit", 32, 4, LEVELS, 64, 2, 2)


def _inputs(batch: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    context, targets = MultiBlockMaskCollator((8, 8), min_keep=4).sample(batch, g)
    return images, context, targets


def _grads(model, precision: str, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = model.to(device)
    hardware = Hardware(device=device.type, precision=precision, batch_size=16, num_workers=0)
    images, context, targets = (t.to(device) for t in _inputs())
    model.zero_grad(set_to_none=True)
    out = forward_backward(model, normalize(images), context, targets, hardware.autocast(), hardware.grad_scaler())
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach().float().cpu(), grads


def test_bf16_autocast_step_matches_fp32_within_tolerance():
    """Loss within 2% and every parameter's gradient within 10% (relative L2 error) of the
    fp32 step on the same device; fp32 on the device within 1e-4 of fp32 on the CPU."""
    loss32, g32 = _grads(_model(), "fp32", DEVICE)
    loss16, g16 = _grads(_model(), "bf16", DEVICE)
    assert g32.keys() == g16.keys() and len(g32) > 20
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32), (float(loss16), float(loss32))
    for name, ref in g32.items():
        err = (g16[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 0.1, f"{name}: relative gradient error {err:.3f} under bf16"
    loss_cpu, g_cpu = _grads(_model(), "fp32", CPU)
    assert abs(loss_cpu - loss32) <= 1e-4 * abs(loss_cpu)
    for name, ref in g_cpu.items():
        torch.testing.assert_close(g32[name], ref, rtol=1e-3, atol=1e-5, msg=name)


def _png_folder(root: Path, n: int = 16) -> Path:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        smooth = F.interpolate(torch.rand(1, 3, 5, 5, generator=g), size=(32 + 4 * (i % 3), 32), mode="bilinear")
        Image.fromarray((smooth[0] * 255).byte().permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    return root


def test_device_cache_augments_on_the_gpu_as_on_the_cpu(tmp_path):
    """cache: device: the decoded images live on the GPU and the batch is cropped, flipped
    and jittered there; the same parameters give the CPU result within 1 grey level."""
    tf = train_transform(32, [0.3, 1.0], [3 / 4, 4 / 3], 0.5, 0.4)
    ds = ImageFolder(str(_png_folder(tmp_path)), "train", tf, cache="device")
    torch.manual_seed(0)
    params = torch.stack([ds[i][0].values for i in range(len(ds))])
    sources = torch.zeros(len(ds), dtype=torch.long)
    on_device = augment_batch(params, sources, [ds.cache], DEVICE)
    on_cpu = augment_batch(params, sources, [ds.cache], CPU)
    assert on_device.device.type == DEVICE.type and on_device.dtype == torch.uint8
    diff = (on_device.cpu().int() - on_cpu.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    assert ds.cache._on_device[str(DEVICE)].device.type == DEVICE.type  # kept there, not re-sent per batch


def test_fused_adamw_and_foreach_ema_match_the_cpu_path():
    """Three optimizer steps with identical gradients: fused AdamW on the device (what the
    Trainer builds on CUDA) against foreach AdamW on the CPU, then the EMA lerp: every
    online and target parameter within 1e-5 (relative) of the CPU's."""
    cpu_model, dev_model = _model(), _model().to(DEVICE)
    optimization = Optimization()
    cpu_opt = optimization.build(cpu_model, fused=False)
    dev_opt = optimization.build(dev_model, fused=DEVICE.type == "cuda")
    if DEVICE.type == "cuda":
        assert dev_opt.defaults["fused"] is True
    scaler = Hardware(device="cpu", precision="fp32").grad_scaler()
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        for (_, p), (_, q) in zip(cpu_model.named_parameters(), dev_model.named_parameters()):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g) * 1e-2
                q.grad = p.grad.to(DEVICE)
        for model, opt in ((cpu_model, cpu_opt), (dev_model, dev_opt)):
            optimization.apply(opt, step, 10)
            optimizer_update(model, opt, scaler, None, optimization.momentum_at(step, 10))
    for (name, p), (_, q) in zip(cpu_model.state_dict().items(), dev_model.state_dict().items()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(cpu_model.target_encoder.blocks[0].attn.qkv.weight, _model().target_encoder.blocks[0].attn.qkv.weight)


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, tiny):
    """20 Trainer steps on the device (2 epochs of 160 synthetic images, batch 16, bf16,
    one loader worker, pinned memory), and the same run stopped at step 10 and resumed."""
    cfg = ["dataset.num_train=160", "dataset.num_val=64", *HARDWARE, "hardware.num_workers=1"]
    root = tmp_path_factory.mktemp("cuda_runs")
    full = train(tiny(*cfg), root / "full", "synthetic")
    stop = pytest.MonkeyPatch()
    stop.setattr(Trainer, "stop_requested", lambda self, step: step == 10)
    try:
        part = train(tiny(*cfg), root / "split", "synthetic")
    finally:
        stop.undo()
    resumed = train(tiny(*cfg), root / "split", "synthetic")
    return root, full, part, resumed


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r]


def test_twenty_trainer_steps_with_resume(cuda_run):
    """The resumed run continues at step 11 and ends at step 20 like the uninterrupted one.
    Bit-identity is tested on the CPU (tests/test_train.py); on a GPU the attention backward
    accumulates with atomics, so losses must agree within 1% (relative) at every step."""
    root, full, part, resumed = cuda_run
    assert full.status == "completed" and full.steps == 20
    assert part.status == "interrupted" and part.steps == 10
    assert resumed.status == "completed" and resumed.steps == 20 and resumed.resumed_from_step == 10
    a, b = _losses(root / "full"), _losses(root / "split")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 21))
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 0.01 * abs(x), (step, x, y)
    state = ckpt.load(root / "full" / "checkpoints" / "last.pt")
    assert "arch: test_vit" in state["config"] and f"device: {DEVICE.type}" in state["config"]


def test_checkpoint_saved_on_the_gpu_loads_on_the_cpu(cuda_run):
    """Every tensor of a checkpoint written by a GPU run is a CPU tensor when loaded, and the
    CPU model rebuilt from it computes the GPU model's features (fp32, within 1e-4)."""
    root = cuda_run[0] / "full"
    state = ckpt.load(root / "checkpoints" / "last.pt")
    assert all(t.device.type == "cpu" for t in state["model"].values())
    _, model, _, step = load_run(root)
    assert step == 20 and next(model.parameters()).device.type == "cpu"
    images = normalize(_inputs(8)[0])
    on_cpu = model.features(images)
    on_device = model.to(DEVICE).features(images.to(DEVICE)).cpu()
    torch.testing.assert_close(on_device, on_cpu, rtol=1e-4, atol=1e-4)


def test_evaluate_and_export_a_gpu_run(cuda_run, compose_config, tmp_path):
    """`python -m hjepa.evaluate eval=knn` on the device scores trained and random-init
    encoders within 5 points of the same evaluation on the CPU (bf16 features against fp32),
    and the exported backbone loads into timm strictly."""
    root = cuda_run[0] / "full"
    results = {}
    for where, device in (("device", DEVICE.type), ("cpu", "cpu")):
        results[where] = evaluate(compose_config(f"run={root}", "eval=knn", f"hardware.device={device}",
                                                 "hardware.num_workers=0", name="evaluate"))
        (root / runs.EVAL_CACHE).rename(tmp_path / f"cache_{where}")  # the second run extracts its own features
    dev, cpu = results["device"], results["cpu"]
    assert dev["num_eval"] == cpu["num_eval"] == 64
    for which in ("trained", "random_init"):
        assert abs(dev[which]["top1"] - cpu[which]["top1"]) <= 5.0, (which, dev[which], cpu[which])
    meta = export(root, out=str(tmp_path / "backbone.pt"))
    backbone = timm.create_model(meta["arch"], pretrained=False, **meta["kwargs"])
    backbone.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True), strict=True)


def _jpeg_samples(imagenet_dir: Path, tmp_path: Path, n: int = 48) -> list[tuple[str, int]]:
    """Real ImageNet photos when the shared data is there (grayscale ones included), else
    generated JPEGs of several sizes; one truncated JPEG at the end."""
    if imagenet_dir.is_dir():
        files = sorted(imagenet_dir.iterdir())[: n]
    else:
        g = torch.Generator().manual_seed(0)
        files = []
        for i in range(n):
            h, w = 100 + 37 * (i % 9), 120 + 29 * (i % 7)
            smooth = F.interpolate(torch.rand(1, 3, h // 10, w // 10, generator=g), size=(h, w), mode="bilinear")
            files.append(tmp_path / f"{i:03d}.jpg")
            Image.fromarray((smooth[0] * 255).byte().permute(1, 2, 0).numpy()).save(files[-1], quality=90)
    data = files[0].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return [(str(f), 0) for f in files] + [(str(tmp_path / "truncated.jpg"), 0)]


def test_gpu_decoding_matches_cpu_decoding(tmp_path):
    """decode: gpu on the device (nvJPEG, batched) against the same code on the CPU
    (libjpeg-turbo): the same crops, pixels within 2 grey levels on average (the two IDCTs
    and chroma upsamplers differ); a truncated JPEG in the batch is skipped by on_error."""
    shared = Path(os.environ.get("HJEPA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    samples = _jpeg_samples(shared / "imagenet-samples", tmp_path)
    tf = train_transform(224, [0.3, 1.0], [3 / 4, 4 / 3], 0.5, 0.0)
    ds = FileDataset(samples, ["x"], tf, decode="gpu")
    torch.manual_seed(0)
    batch = EncodedBatch.stack([ds[i][0] for i in range(len(ds))])
    skipped = {}

    def unreadable(device):
        return lambda row, error: skipped.setdefault(device, []).append(row)

    on_device = decode_batch(batch, DEVICE, unreadable("device"))
    on_cpu = decode_batch(batch, CPU, unreadable("cpu"))
    assert on_device.device.type == DEVICE.type and on_device.shape == on_cpu.shape == (len(samples), 3, 224, 224)
    last = len(samples) - 1
    assert skipped.get("cpu") == [last]
    # nvJPEG may return garbage for a truncated file rather than fail: compare the others.
    diff = (on_device.cpu()[:last].float() - on_cpu[:last].float()).abs()
    per_image = diff.mean(dim=(1, 2, 3))
    assert per_image.max() < 2.0, per_image.tolist()


def test_training_decodes_jpegs_on_the_gpu(tmp_path, tiny):
    """dataset.decode=gpu in the Trainer: loader workers send bytes, the device decodes;
    one epoch of 48 JPEGs (and a PNG, cropped in the worker) completes with a finite loss."""
    g = torch.Generator().manual_seed(0)
    for i in range(49):
        d = tmp_path / "imgs" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        smooth = F.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(48 + 8 * (i % 4), 64), mode="bilinear")
        Image.fromarray((smooth[0] * 255).byte().permute(1, 2, 0).numpy()).save(d / (f"{i}.png" if i == 7 else f"{i}.jpg"))
    cfg = tiny("dataset=image_folder", f"dataset.root={tmp_path / 'imgs'}", "dataset.decode=gpu", "image_size=32",
               "patch_size=4", "trainer.epochs=1", "hardware.batch_size=8", "hardware.num_workers=2", *HARDWARE)
    summary = train(cfg, tmp_path / "run")
    assert summary.status == "completed" and summary.steps == 49 // 8 and 0 < summary.final_loss < 10
