"""What every command shares: one spelling of each flag, and how a flag becomes a value.

Flags: ``--bootstrap`` (Kafka) and ``--kafka-*`` (its SASL and TLS settings), ``--episodic`` and ``--longterm`` (store locations, a folder
or ``s3://bucket/prefix``), ``--s3-from-stack`` (the local stack's S3 endpoint and credentials),
``--storage-option KEY=VALUE``, ``--key-file``/``--key-env`` (a private key), ``--public-key``
(a public key file or its hex; repeated for rotated keys). Defaults come from
:class:`memstream.settings.Settings`, then from the local stack (``memstream infra up``).
"""

from __future__ import annotations

from pathlib import Path

from memstream.crypto.keys import KeyRing, SigningKey, VerifyKey
from memstream.errors import ConfigError
from memstream.infra.stack import Stack
from memstream.settings import KafkaSecurity, Settings, cache_dir


def settings() -> Settings:
    return Settings.load()


def add_bootstrap(parser) -> None:
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: $MEMSTREAM_KAFKA_BOOTSTRAP, "
                                            "else the broker of `memstream infra up`)")


    g = parser.add_argument_group("Kafka security (default: the [kafka] settings, MEMSTREAM_KAFKA_*)")
    g.add_argument("--kafka-security-protocol", choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
    g.add_argument("--kafka-sasl-mechanism", choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    g.add_argument("--kafka-sasl-username")
    # no password flag: a command line is visible to every user of the machine
    g.add_argument("--kafka-sasl-password-file", help="a file holding the SASL password "
                                                      "(or $MEMSTREAM_KAFKA_SASL_PASSWORD)")
    g.add_argument("--kafka-ssl-cafile", help="PEM CA bundle that signed the brokers' certificates")
    g.add_argument("--kafka-ssl-certfile", help="PEM client certificate (TLS client authentication)")
    g.add_argument("--kafka-ssl-keyfile", help="its PEM private key")
    g.add_argument("--kafka-ssl-no-check-hostname", action="store_true", default=None,
                   help="accept a broker certificate that does not name the host dialled")


def bootstrap(args) -> str:
    return getattr(args, "bootstrap", None) or settings().kafka.bootstrap or Stack().kafka_bootstrap()


def kafka_security(args) -> KafkaSecurity:
    """The settings' Kafka security, each ``--kafka-*`` flag given replacing its setting."""
    import dataclasses

    security = settings().kafka.security
    flags = {f.name: getattr(args, f"kafka_{f.name}", None) for f in dataclasses.fields(KafkaSecurity)}
    if getattr(args, "kafka_ssl_no_check_hostname", None):
        flags["ssl_check_hostname"] = False
    given = {k: v for k, v in flags.items() if v is not None}
    if given.get("sasl_password_file"):
        given["sasl_password"] = None  # the flag's file replaces a password from the settings
    return dataclasses.replace(security, **given) if given else security


def add_episodic(parser) -> None:
    parser.add_argument("--episodic", default=None,
                        help="episodic store: a folder (default $MEMSTREAM_CACHE/episodic) or s3://bucket/prefix")
    add_storage(parser)


def add_storage(parser) -> None:
    if any(a.dest == "s3_from_stack" for a in parser._actions):
        return
    parser.add_argument("--s3-from-stack", action="store_true",
                        help="take the S3 endpoint and credentials of the local stack (for s3:// stores)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="LanceDB storage option, e.g. aws_endpoint=http://127.0.0.1:8333; repeat")


def storage_options(args, uri: str | None) -> dict[str, str] | None:
    options = {}
    if uri and uri.startswith("s3://") and getattr(args, "s3_from_stack", False):
        options.update(Stack().s3_config().storage_options())
    for item in getattr(args, "storage_option", []) or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"--storage-option {item!r}: expected KEY=VALUE")
        options[k] = v
    return options or None


def episodic(args) -> tuple[str, dict[str, str] | None]:
    uri = args.episodic or settings().episodic.store or str(cache_dir() / "episodic")
    return uri, storage_options(args, uri)


def add_signing_key(parser, role: str) -> None:
    parser.add_argument("--key-file", help=f"the {role}'s Ed25519 signing key (a file of `memstream keys new`)")
    parser.add_argument("--key-env", help="...or the environment variable that holds it (PEM, hex or base64)")


def signing_key(args, role: str) -> SigningKey:
    if args.key_file:
        return SigningKey.from_file(args.key_file, role=role)
    if args.key_env:
        return SigningKey.from_env(args.key_env)
    raise ConfigError(f"no {role} key: pass --key-file PATH (make one with `memstream keys new --role {role}`) "
                      "or --key-env VAR")


def add_public_keys(parser, required: bool = False, what: str = "validator") -> None:
    parser.add_argument("--public-key", action="append", default=[], required=required,
                        help=f"a {what} public key: a file (PEM, hex or base64) or the hex itself; repeat for "
                             "rotated keys")


def public_key(text: str) -> VerifyKey:
    path = Path(text)
    if path.is_file():
        data = path.read_bytes()
        if b"PRIVATE KEY" in data:  # a key file of `memstream keys new`: its public half
            return SigningKey.from_file(path).verify_key
        return VerifyKey.parse(data)
    return VerifyKey.parse(text)


def keyring(texts) -> KeyRing:
    return KeyRing(public_key(t) for t in texts)
