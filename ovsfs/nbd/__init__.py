"""The NBD door: a fixed-newstyle NBD server over the volume engine.

protocol.py holds the wire format as pure functions, connection.py one client's
negotiation and transmission phases, server.py the listeners (unix, TCP, TLS).
"""
