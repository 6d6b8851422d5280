"""The front-end daemon: handshake, region reservation, SHMEM_MAP/UNMAP service, reset."""

from .endpoint import Frontend, FrontendOptions, HandshakeError

__all__ = ["Frontend", "FrontendOptions", "HandshakeError"]
