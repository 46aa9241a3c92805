"""vhost-user and virtqueue structures shared by the shm door (back end, `ovsfs.shm`) and
the client library (front end, `ovsfs.client`): layouts and constants, no I/O."""
