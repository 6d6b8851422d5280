"""backend_sim: a simulated vhost-user device back-end with VIRTIO Shared Memory regions."""
