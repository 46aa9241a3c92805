"""The management API of the node daemon: HTTP/1.1 + JSON on a unix socket."""
