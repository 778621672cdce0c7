"""Hotplug: declarative udev matching (``match``) and observed device presence (``monitor``).

Neither module imports pyudev at import time; it is loaded when a ``match:`` is resolved or
a ``DeviceWatcher`` starts, so configs validate and the exporter starts without libudev.
"""

from jumpstarter_exporter.hotplug.match import AmbiguousMatch, DeviceMatch, find, resolve
from jumpstarter_exporter.hotplug.monitor import DeviceWatch, DeviceWatcher, udev_running

__all__ = [
    "AmbiguousMatch",
    "DeviceMatch",
    "DeviceWatch",
    "DeviceWatcher",
    "find",
    "resolve",
    "udev_running",
]
