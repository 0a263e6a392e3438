"""medmax-pipeline: a reproducible workflow to rebuild, extend and retrain MedMax."""

__version__ = "0.1.0"
