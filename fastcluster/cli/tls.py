"""The TLS context `fastcluster run` serves with, made in the primary (so a bad
certificate, key password or cipher list is a clear error before any fork)."""

from __future__ import annotations

import ssl
from typing import Any

CERT_REQS = {"0": ssl.CERT_NONE, "none": ssl.CERT_NONE, "1": ssl.CERT_OPTIONAL,
             "optional": ssl.CERT_OPTIONAL, "2": ssl.CERT_REQUIRED,
             "required": ssl.CERT_REQUIRED}


def tls_context(settings: dict[str, Any]) -> ssl.SSLContext | None:
    certfile, keyfile = settings["ssl_certfile"], settings["ssl_keyfile"]
    if not certfile:
        if keyfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    password = settings["ssl_keyfile_password"]
    try:
        ctx.load_cert_chain(certfile, keyfile or None, password or None)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--ssl-certfile {certfile!r}"
                         + (f" / --ssl-keyfile {keyfile!r}" if keyfile else "")
                         + f": cannot load the certificate and key: {e}") from None
    ctx.verify_mode = CERT_REQS[settings["ssl_cert_reqs"]]
    if settings["ssl_ca_certs"]:
        try:
            ctx.load_verify_locations(settings["ssl_ca_certs"])
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"--ssl-ca-certs {settings['ssl_ca_certs']!r}: cannot load "
                             f"the CA certificates: {e}") from None
    if "ssl_ciphers" in settings["given"]:
        try:
            ctx.set_ciphers(settings["ssl_ciphers"])
        except ssl.SSLError as e:
            raise ValueError(f"--ssl-ciphers {settings['ssl_ciphers']!r}: no cipher "
                             f"matches it (an OpenSSL cipher list): {e}") from None
    return ctx
