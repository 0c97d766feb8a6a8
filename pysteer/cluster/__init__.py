"""The cluster as the operator describes it: nodes, steering node, services, certificates."""

from pysteer.cluster.config import ClusterConfig, ConfigError, NodeConfig, Service, load_config

__all__ = ["ClusterConfig", "ConfigError", "NodeConfig", "Service", "load_config"]
