"""shmemctl: the vhost-user VIRTIO Shared Memory extension, both sides, driven from a shell."""

__version__ = "0.1.0"
