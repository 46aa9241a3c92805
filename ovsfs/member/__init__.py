"""This node as a member of a cluster (see core.py). Public: Member, serve."""

from ovsfs.member.core import Member, serve

__all__ = ["Member", "serve"]
