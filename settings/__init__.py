"""The whole config: every layer's section composed into one ClusterConfig (settings/cluster.py)."""
