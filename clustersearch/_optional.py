"""Optional dependencies: what a broker or result backend URL needs installed.

kombu's Redis transport (a ``redis://`` broker) and Celery's Redis result
backend need the ``redis`` package, and kombu 5.7's transport also imports
``packaging``, which kombu declares only in its own ``redis`` extra. Both come
with ``pip install 'clustersearch[redis]'``. Without them kombu fails with an
``AttributeError`` or a ``ModuleNotFoundError`` deep in a connection attempt;
these helpers turn that into an error that says what to install.
"""

import importlib
from urllib.parse import urlparse

from .exceptions import MissingDependencyError

__all__ = ["check_url", "missing_dependency"]

#: URL schemes served by kombu's Redis transport or Celery's Redis backend.
_REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})

#: Imported in this order: ``redis`` first, because kombu's transport only
#: fails with an AttributeError when it is missing; then the transport itself,
#: which imports whatever else this kombu needs (``packaging`` in 5.7).
_REDIS_MODULES = ("redis", "kombu.transport.redis")

#: Top-level modules whose absence means the ``redis`` extra is missing.
_REDIS_NEEDS = frozenset({"redis", "packaging"})

_INSTALL = "pip install 'clustersearch[redis]'"


def _needs_redis(url):
    return bool(url) and urlparse(url).scheme.lower() in _REDIS_SCHEMES


def _shown(url):
    """``url`` without user name and password."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    if parsed.port:
        host = f"{host}:{parsed.port}"
    return parsed._replace(netloc=host).geturl()


def _error(url, role, module, exc):
    return MissingDependencyError(
        f"the Redis {role} {_shown(url)!r} needs the Python package {module!r}, "
        f"which is not installed in this environment ({type(exc).__name__}: "
        f"{exc}). Install clustersearch with its Redis extra: {_INSTALL}"
    )


def _top(name):
    return (name or "").split(".")[0]


def check_url(url, role):
    """Raise MissingDependencyError if ``url`` needs a package not installed.

    Parameters
    ----------
    url : str or None
        A broker or result backend URL; None and non-Redis URLs pass.
    role : str
        ``"broker"`` or ``"result backend"``, for the message.
    """
    if not _needs_redis(url):
        return
    for module in _REDIS_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise _error(url, role, _top(exc.name) or module, exc) from exc


def missing_dependency(exc, url, role):
    """A MissingDependencyError if ``exc`` or its cause or context is an
    ImportError for what the Redis extra installs, else None."""
    if not _needs_redis(url):
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError) and _top(exc.name) in _REDIS_NEEDS:
            return _error(url, role, _top(exc.name), exc)
        exc = exc.__cause__ or exc.__context__
    return None
