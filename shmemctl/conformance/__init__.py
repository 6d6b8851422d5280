"""A conformance suite for other implementations: point it at a front-end or a back-end."""

from .backend import check_backend
from .frontend import check_frontend, parse_layout
from .report import Report, Result

__all__ = ["Report", "Result", "check_backend", "check_frontend", "parse_layout"]
