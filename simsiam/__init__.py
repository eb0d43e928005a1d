"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("simsiam")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.2.0"
