"""jumpstarter-exporter: a Jumpstarter exporter daemon, wire-compatible with upstream 0.9."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jumpstarter-exporter")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = ["__version__"]
