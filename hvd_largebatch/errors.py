"""Exceptions raised on bad input, each naming what is wrong before expensive work starts."""


class ConfigError(ValueError):
    """A configuration value is invalid.

    ``key`` is the dotted config key (for example ``schedule.milestones``) so that a
    user can find the offending line; it is part of the message.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class DataError(RuntimeError):
    """A data source is unusable (missing, unreadable or corrupt file, bad label)."""


class DistributedMismatchError(RuntimeError):
    """Ranks disagree on something that must be identical on all of them."""


class DeviceError(RuntimeError):
    """A device failed (CUDA error, out of memory, decoder engine failure): not the data's fault.

    ``device`` names it (``cuda:0``, ``cpu``) and is part of the message."""

    def __init__(self, device: str, message: str):
        self.device = device
        super().__init__(f"{device}: {message}")
