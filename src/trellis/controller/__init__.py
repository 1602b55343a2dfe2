"""Cluster-wide controllers: one replica each, beside the agents (`kubesync`)."""
