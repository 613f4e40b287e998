"""H-JEPA pretraining for Vision Transformers, composed with Hydra."""

from pathlib import Path


def _conf_dir() -> str:
    """The Hydra config tree the entry points compose from: ``hjepa/conf/`` in an installed
    copy (``pip install .`` maps the repository's top-level ``conf/`` there), else the
    ``conf/`` beside the package in a source checkout (editable install or PYTHONPATH)."""
    here = Path(__file__).resolve().parent
    for path in (here / "conf", here.parent / "conf"):
        if (path / "config.yaml").is_file():
            return str(path)
    return str(here / "conf")  # absent: Hydra's own error names this folder


# Absolute, so it does not depend on the working directory or on how hjepa was installed.
CONF_DIR = _conf_dir()
