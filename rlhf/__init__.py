"""Distributed RLHF on Ray: SFT and reward models on Ray Train, PPO with vLLM rollouts, Ray Serve."""

import os as _os

# A local Ray must advertise 127.0.0.1, not the machine's network address. Ray reads this flag when
# it is imported, so it is set here, before anything of ours imports ray. A driver meant for a
# cluster has RAY_ADDRESS set (Ray Jobs sets it), and then the flag is left alone.
if "RAY_ADDRESS" not in _os.environ:
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

__version__ = "0.1.0"
