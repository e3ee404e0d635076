"""The feature decomposing network, its critic and the inference bundle."""

from __future__ import annotations

from fdn_core.model.critic import Critic
from fdn_core.model.fdn import FDN, FDNConfig, FDNOutput, condition_map

__all__ = ["FDN", "Critic", "FDNConfig", "FDNOutput", "condition_map"]
