"""The settings of `fastcluster run` that uvicorn and gunicorn users type from
habit: binding, reload, logging, limits, headers, TLS details, files.

Each group is a tuple of Options that cli/options.py's OPTIONS takes whole; the
names, flags and defaults follow uvicorn's (its `--host`, `--limit-*`,
`--header`...) or gunicorn's (`--umask`, `--access-logfile`,
`--limit-request-*`...) where they have one. See cli/options.py for how a
setting is read (flag, environment, config file).
"""

from __future__ import annotations

from .parse import Option, boolean, choice, fd_number, header, int_range, nonempty, octal
from .parse import text as _text

# gunicorn's default access log format (its atoms: see cli/access.py)
ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


BINDING: tuple[Option, ...] = (
    Option("host", nonempty("host"), "",
           "uvicorn's --host: serve HOST:PORT (PORT from --port, default 8000); added to "
           "the --bind addresses", "HOST"),
    Option("port", int_range(0, 65535), None,
           "uvicorn's --port: serve HOST:PORT (HOST from --host, default 127.0.0.1)", "PORT"),
    Option("uds", nonempty("path"), "", "uvicorn's --uds: serve the Unix socket PATH "
           "(as --bind unix:PATH)", "PATH"),
    Option("fd", fd_number, None,
           "serve the listening socket inherited as this file descriptor (uvicorn's --fd)",
           "N"),
    Option("umask", octal, None,
           "Unix sockets the primary creates get mode 0777 & ~UMASK (gunicorn's --umask; "
           "default: mode 0666, as uvicorn)", "OCTAL"),
)

RELOAD: tuple[Option, ...] = (
    Option("reload", boolean, False,
           "development: replace the workers (a rolling restart: no request is dropped) "
           "when a watched file changes (needs watchfiles; not with --preload)", "BOOL"),
    Option("reload_dir", nonempty("directory"), [],
           "a directory --reload watches (repeatable; default: the current one)", "DIR",
           multiple=True),
    Option("reload_include", nonempty("pattern"), ["*.py"],
           "a glob of file names (or paths) whose change reloads (repeatable)", "GLOB",
           multiple=True),
    Option("reload_exclude", nonempty("pattern"), [".*", ".py[cod]", ".sw.*", "~*"],
           "a glob of file names (or paths) whose change never reloads (repeatable)",
           "GLOB", multiple=True),
)

LOGGING: tuple[Option, ...] = (
    Option("log_config", nonempty("file"), "",
           "logging configuration: a .json or .yaml/.yml file for logging.config.dictConfig, "
           "else an .ini file for logging.config.fileConfig (replaces --log-format, "
           "--log-level and the log files)", "FILE"),
    Option("log_format", choice("text", "json"), "text",
           "text lines, or one JSON object per line", "text|json"),
    Option("access_log_format", nonempty("format"), ACCESS_LOG_FORMAT,
           "the access log line, with gunicorn's atoms: %%(h)s client, %%(r)s request "
           "line, %%(s)s status, %%(b)s body bytes, %%(f)s referer, %%(a)s user agent, "
           "%%(D)s microseconds, %%(M)s ms, %%(L)s seconds, %%({name}i)s a request header, "
           "%%({name}o)s a response header...; turns --access-log on", "FORMAT",
           aliases=("--access-logformat",)),
    Option("access_logfile", nonempty("file"), "",
           "write the access log to FILE ('-': standard output); turns --access-log on",
           "FILE"),
    Option("error_logfile", nonempty("file"), "-",
           "write the server's log to FILE ('-': standard error)", "FILE",
           aliases=("--log-file",)),
)

LIMITS: tuple[Option, ...] = (
    Option("limit_concurrency", int_range(0, 1 << 20), 0,
           "a worker answers 503 when it has this many connections or requests "
           "open (uvicorn's --limit-concurrency, per worker); 0: no limit", "N"),
    Option("limit_request_line", int_range(0, 8190), 0,
           "the longest request line, in bytes (gunicorn's; longer: 400); "
           "0: no limit (as uvicorn)", "BYTES"),
    Option("limit_request_fields", int_range(0, 32768), 0,
           "the most header fields in a request (gunicorn's; more: 431); 0: no limit",
           "N"),
    Option("limit_request_field_size", int_range(0, 1 << 20), 0,
           "the longest header field ('Name: value'), in bytes (gunicorn's; longer: "
           "431); 0: no limit", "BYTES"),
)

HEADERS: tuple[Option, ...] = (
    Option("header", header, [],
           "a header NAME:VALUE added to every response (repeatable; in the "
           "environment one per line)", "NAME:VALUE", multiple=True, sep="\n"),
    Option("server_header", boolean, True, "send 'server: uvicorn' (--no-server-header:"
           " none)", "BOOL"),
    Option("date_header", boolean, True, "send a Date header (--no-date-header: none)",
           "BOOL"),
    Option("proxy_headers", boolean, True,
           "take the client's address and scheme from X-Forwarded-For/-Proto sent "
           "by --forwarded-allow-ips (--no-proxy-headers: never)", "BOOL"),
)

TLS: tuple[Option, ...] = (
    Option("ssl_keyfile_password", _text, "", "the password of an encrypted "
           "--ssl-keyfile", "PASSWORD"),
    Option("ssl_ca_certs", nonempty("file"), "", "CA certificates (PEM) to verify "
           "client certificates with (see --ssl-cert-reqs)", "FILE", aliases=("--ca-certs",)),
    Option("ssl_cert_reqs", choice("0", "1", "2", "none", "optional", "required"), "0",
           "client certificates: 0/none (not asked), 1/optional, 2/required "
           "(uvicorn's, as ssl.CERT_*)", "0|1|2", aliases=("--cert-reqs",)),
    Option("ssl_ciphers", nonempty("cipher list"), "TLSv1",
           "the OpenSSL cipher list (uvicorn's default TLSv1)", "CIPHERS",
           aliases=("--ciphers",)),
)

FILES: tuple[Option, ...] = (
    Option("env_file", nonempty("file"), "",
           "read environment variables from this .env file (python-dotenv) before the "
           "app is checked; the workers inherit them", "FILE"),
    Option("pid", nonempty("file"), "",
           "write the primary's pid to FILE (removed when it stops)", "FILE",
           aliases=("-p",)),
)

MORE: tuple[Option, ...] = BINDING + RELOAD + LOGGING + LIMITS + HEADERS + TLS + FILES
