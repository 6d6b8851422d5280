"""`shmemctl tap`: sits on the vhost-user socket between a front-end and a back-end it
did not start, relays both channels exactly, and reports what an observer sees."""

from .framer import Framer, Unit
from .tap import Endpoint, Tap, TapOptions

__all__ = ["Endpoint", "Framer", "Tap", "TapOptions", "Unit"]
