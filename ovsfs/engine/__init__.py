"""The log-structured volume engine: one per node, serving every volume.

The contract doors and the management API use is in `ovsfs.engine.api`."""

from ovsfs.engine.api import Buffer, Capabilities, Holder, VolumeCatalog, VolumeHandle, parse_name

__all__ = ["Buffer", "Capabilities", "Holder", "VolumeCatalog", "VolumeHandle", "parse_name"]
