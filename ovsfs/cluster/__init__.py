"""Cluster configuration and ownership (embedded store now; etcd when clustered)."""
