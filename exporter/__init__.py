"""srcr exporter: model loading, calibration, pruning and the export pipeline."""

__version__ = "0.1.0"
