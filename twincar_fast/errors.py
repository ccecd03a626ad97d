"""The one exception type for mistakes a user can fix."""


class TwincarError(Exception):
    """A user-fixable problem; its message names the file, key or image and what to do."""


class ConfigError(TwincarError):
    """A bad experiment config: unknown key, wrong type, value out of range, missing file."""


class DataError(TwincarError):
    """A dataset that can't be read: unknown layout, missing annotations, bad labels."""
