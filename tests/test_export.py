"""The exported backbone is a stock timm model: strict load, same features as the project."""

import json
from pathlib import Path

import pytest
import timm
import torch

from hjepa.data.synthetic import SyntheticShapes
from hjepa.data.transforms import eval_transform, normalize
from hjepa.errors import CheckpointError
from hjepa.export import export
from hjepa.runs import load_run
from hjepa.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny):
    """A real run, briefly trained so that the EMA target encoder differs from its init."""
    cfg = tiny("dataset.num_train=128", "hardware.batch_size=32", "trainer.epochs=1", "optim.ema_momentum=0.5",
               "optim.final_ema_momentum=0.5")
    path = tmp_path_factory.mktemp("run")
    assert train(cfg, path, "synthetic").status == "completed"
    return path


def test_exported_backbone_loads_into_timm_strictly_and_reproduces_features(run_dir, tmp_path):
    meta = export(run_dir, out=str(tmp_path / "backbone.pt"))
    assert json.loads((tmp_path / "backbone.json").read_text()) == meta
    assert meta["kwargs"]["num_classes"] == 0 and meta["source"]["step"] == 4
    assert meta["call"] == ("timm.create_model('test_vit', pretrained=False, num_classes=0, img_size=32, patch_size=4, "
                            "class_token=False, global_pool='avg', fc_norm=False, drop_path_rate=0.0)")

    # Downstream use, without this package: exactly the documented call.
    model = timm.create_model(meta["arch"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True), strict=True)
    model.eval()

    _, project, _, _ = load_run(run_dir)
    dataset = SyntheticShapes("val", eval_transform(32), num_val=8)
    images = normalize(torch.stack([dataset[i][0] for i in range(8)]))
    with torch.no_grad():
        tokens = project.features(images)
        torch.testing.assert_close(model.forward_features(images), tokens)
        torch.testing.assert_close(model(images), tokens.mean(1))
        # The target encoder is exported, not the online encoder.
        assert not torch.allclose(project.encoder.forward_features(images), tokens)


def test_export_without_a_checkpoint_is_a_clear_error(run_dir, tmp_path):
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="no checkpoint: .*last.pt does not exist"):
        export(tmp_path)
    assert not (tmp_path / "backbone.pt").exists()
