"""shared/access.py and api/audit.py: token tables, source allow-lists, the exposure warning."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from pydantic import ValidationError

from api.audit import exposure_warning, record_submission
from shared import access
from shared.access import source_allowed, token_name
from shared.settings import Settings


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_plain_tokens_get_stable_names_and_only_hashes_are_kept():
    settings = Settings(api_tokens="tokA, alice:tokB ,tokC")
    table = settings.token_table
    assert table == {"token1": _sha("tokA"), "alice": _sha("tokB"), "token3": _sha("tokC")}
    assert token_name(table, "tokB") == "alice"
    assert token_name(table, "tokA") == "token1"
    assert token_name(table, "tokB ") is None
    assert token_name(table, "nope") is None


@pytest.mark.parametrize("token", ["tokA", "tokC", "nope"])
def test_every_entry_is_compared_with_compare_digest(monkeypatch, token):
    """A match on the first entry does not end the search early, and no entry is compared
    with ``==``: how long a check takes says nothing about which entry matched, or how much
    of a digest."""
    table = Settings(api_tokens="tokA,tokB,tokC").token_table
    compared = []
    real = hmac.compare_digest

    def compare_digest(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", compare_digest)
    found = token_name(table, token)
    assert compared == [(_sha(token), digest) for digest in table.values()]
    assert found == {"tokA": "token1", "tokC": "token3"}.get(token)


def test_token_file_holds_name_and_sha256_lines(tmp_path):
    file = tmp_path / "tokens"
    file.write_text(f"# who:sha256(token)\n\nalice:{_sha('s3cret-a')}\nbob:{_sha('s3cret-b')}\n")
    settings = Settings(api_tokens_file=file)
    assert token_name(settings.token_table, "s3cret-b") == "bob"
    assert "s3cret" not in settings.model_dump_json()


@pytest.mark.parametrize(
    ("line", "problem"),
    [("alice:abc", "sha256hex"), (f"bad name:{_sha('x')}", "token name"), ("alice", "sha256hex")],
)
def test_bad_token_file_lines_are_refused_with_their_line(tmp_path, line, problem):
    file = tmp_path / "tokens"
    file.write_text(f"ok:{_sha('y')}\n{line}\n")
    with pytest.raises(ValidationError, match=f"line 2.*{problem}"):
        Settings(api_tokens_file=file)


def test_duplicate_or_missing_token_file_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="given twice"):
        Settings(api_tokens="a:x,a:y")
    with pytest.raises(ValidationError, match="FEATUREMAPS_API_TOKENS_FILE"):
        Settings(api_tokens_file=tmp_path / "missing")


def test_nothing_is_allowed_by_default():
    assert not source_allowed(Settings().source_rules, "photos", "any/", "")


def test_prefixes_match_whole_bucket_names_and_slash_boundaries():
    rules = Settings(source_allow="s3://photos/, s3://shared/team/in/").source_rules
    assert source_allowed(rules, "photos", "", "token1")
    assert source_allowed(rules, "photos", "2024/holiday/", "")
    assert not source_allowed(rules, "photos-private", "", "token1")
    assert not source_allowed(rules, "photo", "", "token1")
    assert source_allowed(rules, "shared", "team/in/batch1/", "x")
    assert not source_allowed(rules, "shared", "team/in", "x")
    assert not source_allowed(rules, "shared", "team/inbox/", "x")
    assert not source_allowed(rules, "shared", "team/", "x")


def test_per_token_entries_allow_only_that_token():
    rules = Settings(source_allow="alice=s3://team-data/alice/ s3://public-set/").source_rules
    assert source_allowed(rules, "team-data", "alice/run1/", "alice")
    assert not source_allowed(rules, "team-data", "alice/run1/", "bob")
    assert not source_allowed(rules, "team-data", "alice/run1/", "")
    assert source_allowed(rules, "public-set", "", "bob")


@pytest.mark.parametrize(
    "entry",
    ["s3://photos/in", "s3://photos*/", "s3://photos/*/", "http://photos/", "s3://photos/../x/"],
)
def test_allow_entries_that_could_reach_further_are_refused(entry):
    with pytest.raises(ValidationError, match=r"FEATUREMAPS_SOURCE_ALLOW|s3://bucket"):
        Settings(source_allow=entry)


def test_no_tokens_beyond_loopback_warns_loudly():
    open_settings = Settings()
    assert exposure_warning(["127.0.0.1", "0.0.0.0"], open_settings) is not None
    assert "SECURITY WARNING" in exposure_warning(["::"], open_settings)
    assert exposure_warning(["10.1.2.3"], Settings(api_tokens="t")) is None


def test_loopback_only_does_not_warn():
    hosts = ["127.0.0.1", "::1", "localhost", "unix:/run/api.sock"]
    assert exposure_warning(hosts, Settings()) is None


def test_audit_line_names_the_token_and_cannot_be_forged(caplog):
    # pytest captures the audit logger whether or not an app has made it stop propagating
    # (it attaches its handler to non-propagating loggers too): one record either way.
    with caplog.at_level("INFO", logger="featuremaps.audit"):
        record_submission("batch", "b1", "alice", 10, "archive:x.zip\naccepted job id=f")
    (line,) = caplog.messages
    assert (
        line == "accepted batch id=b1 token=alice size=10 source=archive:x.zip\\naccepted job id=f"
    )
