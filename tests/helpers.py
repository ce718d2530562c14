"""Shared test helpers (tests/ is on pytest's pythonpath)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_params(path: Path, data_root: Path, tmp: Path, **overrides) -> Path:
    """A params.yaml for a tiny, fast run: lite preset at 96 px, batch 8, everything in ``tmp``."""
    import yaml

    from pipeline.params import apply_overrides

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    base = {
        "data.root": str(data_root),
        "model.input_size": 96,
        "model.fusion_channels": 16,
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.loader_workers": 0,
        "train.val_every": 1,
        "train.warmup_epochs": 0.5,
        "train.storage_path": str(tmp / "ray_results" / "train"),
        "tune.storage_path": str(tmp / "ray_results" / "tune"),
        "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    base.update(overrides)
    path.write_text(yaml.safe_dump(apply_overrides(raw, base), sort_keys=False))
    return path
