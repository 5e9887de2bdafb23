"""The error of a bad setting, shared by the run config (``mora_dist.config``) and the methods
(``mora_dist.methods``), which the config builds on."""


class ConfigError(ValueError):
    """A configuration problem: names the file, the field and the fix."""
