"""The trl versions :mod:`pyfastpo.integrations.trl` supports, checked when it is imported.

FastDPOTrainer overrides private methods of trl's ``DPOTrainer``, which change
between minor versions: on another version it would fail deep inside a training
step, or compute something else. Importing this module raises ImportError instead.
"""

from __future__ import annotations

from packaging.version import Version

SUPPORTED_TRL = ("1.13", "1.14")
"""``[low, high)`` of supported trl versions."""


def check_trl_version(version: str) -> None:
    """Raise ImportError, naming the supported range and the pip command, unless
    ``version`` (a trl version string) is supported."""
    low, high = SUPPORTED_TRL
    if not Version(low) <= Version(version) < Version(high):
        raise ImportError(
            f"pyfastpo.integrations.trl supports trl >= {low}, < {high} (it overrides private methods of that "
            f"DPOTrainer); trl {version} is installed: pip install 'trl>={low},<{high}'"
        )


def _installed_trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


check_trl_version(_installed_trl_version())
