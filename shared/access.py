"""Who may call the API, and which S3 sources a caller may have the service read.

Tokens: ``FEATUREMAPS_API_TOKENS`` is a comma list of ``name:token`` entries (a bare
``token`` is named ``token1``, ``token2``, … by its position); ``FEATUREMAPS_API_TOKENS_FILE``
is a file of ``name:sha256hex`` lines, so the running configuration holds no plaintext. Either
way the table kept is name → SHA-256 of the token, a presented token is hashed and compared
with every entry in constant time (:func:`hmac.compare_digest`), and what records and logs
keep is the token's *name*.

Sources: ``FEATUREMAPS_SOURCE_ALLOW`` lists ``s3://bucket/prefix/`` entries, separated by
commas or whitespace; ``name=s3://bucket/prefix/`` allows a prefix for the token called
``name`` only. A source is allowed when its bucket is exactly an entry's bucket and its
prefix starts with the entry's prefix, which always ends at a ``/`` (``s3://photos/`` does not
allow ``s3://photos-private/``; ``s3://photos/in/`` does not allow ``s3://photos/inbox/``).
Nothing is allowed by default.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(plain: str, file: Path | None) -> dict[str, str]:
    """The token table, name → SHA-256 hex digest; ValueError says what is wrong where."""
    table: dict[str, str] = {}
    entries = [e.strip() for e in plain.split(",") if e.strip()]
    for position, entry in enumerate(entries, start=1):
        name, sep, token = entry.partition(":")
        if not sep:
            name, token = f"token{position}", entry
        _add_token(table, name, token_digest(token), f"FEATUREMAPS_API_TOKENS entry {position}")
    if file is not None:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"FEATUREMAPS_API_TOKENS_FILE {file}: {exc.strerror}") from exc
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, digest = line.partition(":")
            where = f"FEATUREMAPS_API_TOKENS_FILE {file} line {number}"
            if not _SHA256_HEX.match(digest.strip().lower()):
                raise ValueError(f"{where}: expected name:sha256hex (64 hex digits)")
            _add_token(table, name.strip(), digest.strip().lower(), where)
    return table


def _add_token(table: dict[str, str], name: str, digest: str, where: str) -> None:
    if not _TOKEN_NAME.match(name):
        raise ValueError(f"{where}: token name {name!r} must be letters, digits, '.', '_', '-'")
    if name in table:
        raise ValueError(f"{where}: token name {name!r} is given twice")
    table[name] = digest


def token_name(table: dict[str, str], token: str) -> str | None:
    """The name of the presented token, or None; every entry is compared, in constant time."""
    presented = token_digest(token)
    found = None
    for name, digest in table.items():
        if hmac.compare_digest(presented, digest):
            found = name
    return found


@dataclass(frozen=True)
class SourceRule:
    bucket: str
    prefix: str  # "" (the whole bucket) or ending in "/"
    token: str | None = None  # None: every caller

    def allows(self, bucket: str, prefix: str, caller: str) -> bool:
        if self.token is not None and self.token != caller:
            return False
        return bucket == self.bucket and prefix.startswith(self.prefix)


def parse_source_allow(value: str) -> tuple[SourceRule, ...]:
    rules = []
    for entry in value.replace(",", " ").split():
        token, sep, url = entry.partition("=")
        if not sep:
            token, url = "", entry
        if sep and not _TOKEN_NAME.match(token):
            raise ValueError(f"FEATUREMAPS_SOURCE_ALLOW {entry!r}: bad token name {token!r}")
        bucket, prefix = split_s3_url(url)
        if prefix and not prefix.endswith("/"):
            raise ValueError(
                f"FEATUREMAPS_SOURCE_ALLOW {entry!r}: a prefix must end with '/' "
                f"(e.g. s3://{bucket}/{prefix}/), so it cannot reach a neighbouring name"
            )
        if "*" in url or ".." in prefix.split("/"):
            raise ValueError(f"FEATUREMAPS_SOURCE_ALLOW {entry!r}: no wildcards or '..'")
        rules.append(SourceRule(bucket, prefix, token or None))
    return tuple(rules)


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix``; ValueError when it is not one."""
    scheme, sep, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not sep or not BUCKET_NAME.match(bucket):
        raise ValueError(f"{url!r} is not an s3://bucket/prefix/ URL")
    return bucket, prefix


def source_allowed(rules: tuple[SourceRule, ...], bucket: str, prefix: str, caller: str) -> bool:
    return any(rule.allows(bucket, prefix, caller) for rule in rules)
