"""The network, as the model sources meet it: fail fast when offline.

Keras Applications weights, TF Hub handles and KerasHub presets are all
downloaded on first use. Offline, a download can wait for minutes (DNS and
connects ignore most timeouts) before it fails with a message about
sockets. :func:`reachable` answers within a bounded time whether a host can
be reached at all, so a source can say what to do instead;
:func:`socket_timeout` bounds the downloads that do start.
"""

import contextlib
import socket
import threading
import urllib.parse

from kerastl.errors import KerastlError


def reachable(url, timeout, advice=""):
    """Connects to the URL's host within ``timeout`` seconds, or raises.

    Args:
        url: an ``http(s)://`` or ``gs://`` URL.
        timeout: seconds for the lookup and the connection together.
        advice: what the error then tells the user to do.

    Raises:
        KerastlError: the host did not answer (offline, firewalled, or no
            such host), naming the host, the URL and the cause.
    """
    parts = urllib.parse.urlparse(url)
    host = parts.hostname
    port = parts.port or (80 if parts.scheme == "http" else 443)
    if parts.scheme == "gs":
        host, port = "storage.googleapis.com", 443
    result = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    # DNS lookups ignore socket timeouts; a daemon thread bounds them too.
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    if not result.get("ok"):
        why = result.get("error") or f"no answer within {timeout:g} s"
        raise KerastlError(
            f"Cannot reach {host} to download {url!r} ({why}). {advice}"
            .rstrip())


@contextlib.contextmanager
def socket_timeout(seconds):
    """Every socket opened inside the block (downloads that would otherwise
    wait forever on a stalled server) times out after ``seconds``."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def is_timeout(error):
    """Whether ``error`` (or the reason it wraps) is a socket timeout."""
    return isinstance(error, (socket.timeout, TimeoutError)) or isinstance(
        getattr(error, "reason", None), (socket.timeout, TimeoutError))
