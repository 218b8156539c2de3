"""taskhead: fine-tune pretrained Hugging Face transformers with PyTorch Lightning, with the head, loss, schedule
and metrics under your control from YAML."""

__version__ = "0.1.0"


def load(path, device="cpu", precision="auto"):
    """Load a directory written by ``taskhead export``; returns a callable predictor on raw inputs. ``precision``:
    ``auto`` (bf16 autocast only where the device computes bf16 natively), ``32-true``, ``bf16-mixed``, ``16-mixed``."""
    from taskhead.core.export import load as _load

    return _load(path, device, precision)


__all__ = ["__version__", "load"]
