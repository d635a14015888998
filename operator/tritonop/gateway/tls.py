"""HTTPS certificates that are renewed while the gateway runs.

A ``kubernetes.io/tls`` Secret is renewed in place (cert-manager does it weeks before the
certificate expires) and the kubelet swaps the mounted files; a server that read them only
at start would serve the old certificate until it expires. The running server's
``SSLContext`` is loaded with the new pair, which every later handshake uses; connections
already open keep theirs.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


class CertificateFiles:
    """A certificate chain and its key on disk, and whether they changed since last read.

    Args:
        cert: the PEM certificate chain.
        key: its PEM private key.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self._seen = self._fingerprint()

    def refresh(self, context: ssl.SSLContext) -> bool:
        """Load the files into ``context`` if they changed; returns whether it did.

        The pair is tried on a scratch context first: a certificate that does not match
        its key (one file renewed before the other) leaves ``context`` as it was, and is
        tried again when the files change again.
        """
        try:
            seen = self._fingerprint()
            if seen == self._seen:
                return False
            self._seen = seen
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key)
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as err:
            log.warning("could not load the renewed TLS certificate %s (%s); serving the one "
                        "loaded before", self.cert, getattr(err, "strerror", None) or err)
            return False
        log.info("TLS certificate %s reloaded", self.cert)
        return True

    def _fingerprint(self) -> tuple[object, ...]:
        try:
            stats = [path.stat() for path in (self.cert, self.key)]
        except OSError:
            return ()
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)
